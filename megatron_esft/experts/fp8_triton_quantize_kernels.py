"""The Triton kernels of experts/fp8_triton_quantize.py (which documents them and launches them). Kept in a module of
their own, imported only where Triton is, and executed afresh when the other kind is needed (`load`): Triton decides
between compiling and interpreting (TRITON_INTERPRET=1) when a kernel is defined.

Each program holds ROWS whole rows in registers (BLOCK >= the row length, a power of two; masked columns read as 0,
which changes no amax or sum), so every input byte is read once and every output byte written once."""

import triton
import triton.language as tl

from megatron_esft.experts.triton_support import fresh_module

FP8_MAX = tl.constexpr(448.0)  # e4m3 (float8_e4m3fn) largest finite value


@triton.jit
def _reciprocal(x):
    """1 / x rounded to nearest (IEEE), as torch's `reciprocal`; a GPU's plain `/` is approximate."""
    return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def _encoding(amax):
    """The encode scale 448 / amax of each row (1 for an all-zero row) as torch evaluates `448 / amax`: a tensor's
    reverse division is `amax.reciprocal() * 448`, two roundings (the reference's results, bit for bit)."""
    return tl.where(amax > 0, _reciprocal(amax) * FP8_MAX, 1.0)


@triton.jit
def _e4m3_bits(y):
    """Software fp32 -> e4m3 (round to nearest even) for |y| <= 448, as uint8 bits: the interpreter's own conversion
    does not carry a rounded-up mantissa into the exponent (1.97 becomes 1.0), so tests under it use this; a GPU
    converts with its `cvt.rn.satfinite.e4m3x2.f32` instruction instead."""
    bits = y.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    magnitude = bits & 0x7FFFFFFF
    # normal e4m3 (>= 2^-6): keep 3 of fp32's 23 mantissa bits, rounding half to even; a carry raises the exponent
    rounded = magnitude + 0x7FFFF + ((magnitude >> 20) & 1)
    normal = ((((rounded >> 23) - 127 + 7) << 3) | ((rounded >> 20) & 7))
    # subnormal e4m3: a multiple of 2^-9, rounded half to even by adding and removing 1.5 * 2^23 (numpy's fp32 math)
    steps = (tl.abs(y) * 512.0 + 12582912.0) - 12582912.0
    subnormal = steps.to(tl.int32)
    out = tl.where(tl.abs(y) >= 0.015625, normal, subnormal)
    return (out | sign).to(tl.uint8)


@triton.jit
def _store_e4m3(pointers, y, mask, INTERPRETED: tl.constexpr):
    """Store y * (its encoding, applied by the caller) clamped to +-448 as e4m3 (pointers to uint8 when INTERPRETED)."""
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if INTERPRETED:
        tl.store(pointers, _e4m3_bits(y), mask=mask)
    else:
        tl.store(pointers, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _store_bf16(pointers, y, mask, INTERPRETED: tl.constexpr):
    """Store fp32 y as bf16 rounded to nearest even (the interpreter truncates: there, in software, as int16 bits)."""
    if INTERPRETED:
        bits = y.to(tl.int32, bitcast=True)
        tl.store(pointers, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(pointers, y.to(tl.bfloat16), mask=mask)


@triton.jit
def _rows(rows, columns, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """This program's row numbers (int64), which of them exist, its column numbers, and the [ROWS, BLOCK] mask."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    row_ok = r < rows
    return r, row_ok, c, row_ok[:, None] & (c < columns)[None, :]


@triton.jit
def _silu_parts(gate):
    """(sigmoid(gate), silu(gate)) in fp32: silu as torch computes it, gate / (1 + exp(-gate))."""
    denominator = 1.0 + tl.exp(-gate)
    return 1.0 / denominator, gate / denominator


@triton.jit
def quantize_rows_kernel(t, q, scale, rows, columns, stride_t, stride_q, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                         INTERPRETED: tl.constexpr):
    r, row_ok, c, mask = _rows(rows, columns, BLOCK, ROWS)
    x = tl.load(t + r[:, None] * stride_t + c[None, :], mask=mask, other=0.0).to(tl.float32)
    encoding = _encoding(tl.max(tl.abs(x), axis=1))
    _store_e4m3(q + r[:, None] * stride_q + c[None, :], x * encoding[:, None], mask, INTERPRETED)
    tl.store(scale + r, _reciprocal(encoding), mask=row_ok)


@triton.jit
def quantize_columns_kernel(w, q, scale, columns, stride_wg, stride_wn, stride_qg, stride_qk, stride_sg,
                            N: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRETED: tl.constexpr):
    """q[g, k, :] = e4m3 of w[g, :, k] with one scale per column (g, k), the amax over its N values: the weights'
    transposed (input-gradient) layout, [G, N, K] (K contiguous) -> [G, K, N] (N contiguous). Two passes over a
    column block (amax, then quantize), the block's N x BK values too many for registers; tiles are read along K
    and stored along N (Triton moves each tile through shared memory between the two layouts)."""
    g = tl.program_id(1).to(tl.int64)
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    k_ok = k < columns
    n = tl.arange(0, BN)
    tiles = w + g * stride_wg + k[None, :]
    amax = tl.zeros([BK], dtype=tl.float32)
    for n0 in range(0, N, BN):
        mask = (n0 + n < N)[:, None] & k_ok[None, :]
        tile = tl.load(tiles + (n0 + n).to(tl.int64)[:, None] * stride_wn, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(tile), axis=0))
    encoding = _encoding(amax)
    out = q + g * stride_qg + k.to(tl.int64)[None, :] * stride_qk
    for n0 in range(0, N, BN):
        mask = (n0 + n < N)[:, None] & k_ok[None, :]
        tile = tl.load(tiles + (n0 + n).to(tl.int64)[:, None] * stride_wn, mask=mask, other=0.0).to(tl.float32)
        _store_e4m3(out + (n0 + n)[:, None], tile * encoding[None, :], mask, INTERPRETED)
    tl.store(scale + g * stride_sg + k, _reciprocal(encoding), mask=k_ok)


@triton.jit
def swiglu_quantize_kernel(h, probs, q, scale, rows, ffn, stride_h, stride_p, stride_q, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr, INTERPRETED: tl.constexpr):
    r, row_ok, c, mask = _rows(rows, ffn, BLOCK, ROWS)
    gate_ptrs = h + r[:, None] * stride_h + c[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + ffn, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(probs + r * stride_p, mask=row_ok, other=0.0)
    act = _silu_parts(gate)[1] * up * p[:, None]
    encoding = _encoding(tl.max(tl.abs(act), axis=1))
    _store_e4m3(q + r[:, None] * stride_q + c[None, :], act * encoding[:, None], mask, INTERPRETED)
    tl.store(scale + r, _reciprocal(encoding), mask=row_ok)


@triton.jit
def swiglu_backward_quantize_kernel(da, h, probs, q, scale, d_probs, dh, rows, ffn, stride_da, stride_h, stride_p,
                                    stride_q, stride_dh, KEEP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                                    INTERPRETED: tl.constexpr):
    r, row_ok, c, mask = _rows(rows, ffn, BLOCK, ROWS)
    gate_ptrs = h + r[:, None] * stride_h + c[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + ffn, mask=mask, other=0.0).to(tl.float32)
    d_act = tl.load(da + r[:, None] * stride_da + c[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(probs + r * stride_p, mask=row_ok, other=0.0)
    sig, silu = _silu_parts(gate)
    d_weighted = d_act * p[:, None]
    d_gate = d_weighted * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = d_weighted * silu
    tl.store(d_probs + r, tl.sum(d_act * silu * up, axis=1), mask=row_ok)
    # one scale for the row of dh = [d_gate | d_up]: the amax over both halves
    encoding = _encoding(tl.maximum(tl.max(tl.abs(d_gate), axis=1), tl.max(tl.abs(d_up), axis=1)))
    q_ptrs = q + r[:, None] * stride_q + c[None, :]
    _store_e4m3(q_ptrs, d_gate * encoding[:, None], mask, INTERPRETED)
    _store_e4m3(q_ptrs + ffn, d_up * encoding[:, None], mask, INTERPRETED)
    tl.store(scale + r, _reciprocal(encoding), mask=row_ok)
    if KEEP:  # the bf16 dh a trainable fc1's weight gradient needs
        dh_ptrs = dh + r[:, None] * stride_dh + c[None, :]
        _store_bf16(dh_ptrs, d_gate, mask, INTERPRETED)
        _store_bf16(dh_ptrs + ffn, d_up, mask, INTERPRETED)


def load(compiled: bool = False):
    """This module executed afresh: its kernels defined under the current TRITON_INTERPRET, or compiled ones."""
    return fresh_module(__name__, __file__, compiled)
