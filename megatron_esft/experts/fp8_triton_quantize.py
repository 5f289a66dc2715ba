"""The FP8 experts' quantizers (activations, and the weights' two layouts) as hand-written Triton kernels, a second
implementation to measure against the `torch.compile`d ones (experts/fp8.py's `CompiledOnCuda`), selected with
`fp8.set_fp8_quantizer("triton")` (the trainer's `--expert-fp8-quantizer triton`, bench/gpu_esft.py's
`"fp8_quantizer"`).

| function | reads | writes |
|---|---|---|
| `quantize_rows(t)` | t [M, K] | e4m3 [M, K], decode scales [M] |
| `quantize_columns(w)` | weights w [G, N, K] | e4m3 [G, K, N] (the input-gradient layout), scales [G, K] |
| `swiglu_quantize(h, probs)` | h [M, 2F], probs [M, 1] | e4m3 silu(gate) * up * probs [M, F], scales [M] |
| `swiglu_backward_quantize(da, h, probs, keep)` | da [M, F], h, probs | e4m3 dh [M, 2F], scales [M], d_probs [M, 1] fp32; bf16 dh if `keep` |

The same math as experts/fp8.py's `quantize_lastdim_reference` and experts/fp8_swiglu.py's references: row-wise
amax -> encode 448 / amax (1 for a zero row) -> clamp(x * encode, +-448) -> e4m3 (round to nearest even), decode
scale 1 / encode, fp32 throughout, rounded as torch's eager ops round (448 / amax is 448 * (1 / amax) there, and the
reciprocals are IEEE-rounded, not a GPU's approximate division).

`quantize_lastdim(t)` routes experts/fp8.py's `quantize_lastdim` (tokens, output gradients, and the weights of
FP8WeightCache in both layouts) to the first two.

Why a second implementation: on the H200 the FP8 experts layer ran ~1.2 ms more non-GEMM work than the bf16 one at
49,152 rows (docs/gpu.md). Inductor makes a reduction "persistent" (the row in registers, read once) only up to
1,024 columns; V2-Lite's rows are 2,048 (tokens, output gradients) and 2 x 1,408 (SwiGLU), so its kernels loop over
each row twice, the SwiGLU backward computing everything twice. Here one program holds whole rows (the next power of
two of the row length, up to `MAX_BLOCK` columns; longer rows keep the compiled kernels), so each input byte is
read once. The weights' transposed layout reduces over N, which is strided in the weights, and stores along N:
`quantize_columns` reads its tiles along K and stores them along N, both coalesced (how torch.compile tiles that
reduction and its stores was not examined). Not yet measured on a GPU: bench/gpu_esft.py's `gemm` job times both
implementations next to a copy of as many bytes.

On a CPU these kernels run under Triton's interpreter (TRITON_INTERPRET=1, tests only), whose fp32 -> e4m3 and
fp32 -> bf16 conversions do not round as a GPU's do: there the kernels convert in software (exact round to nearest
even), on a GPU with the hardware's conversions. Elsewhere (a CPU without the interpreter, a tensor of another
layout or dtype), or once a kernel failed to build (warned once), the functions return None and the caller keeps the
compiled kernels.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from megatron_esft.experts.triton_support import triton_can_run

MAX_BLOCK = 8192  # the widest row held in registers (DeepSeek-V3's hidden size, 7,168, rounds to it)
_failed = False
launches = 0  # kernel launches so far (benchmarks report whether the kernels really ran)


@functools.lru_cache(maxsize=1)
def _kernel():
    """(the kernels' module, whether it is the interpreter's), made on first use."""
    from megatron_esft.experts import fp8_triton_quantize_kernels

    return fp8_triton_quantize_kernels.load(), os.environ.get("TRITON_INTERPRET") == "1"


def launch_settings(columns: int) -> tuple[int, int, int] | None:
    """(BLOCK columns, ROWS per program, warps) for rows of `columns` (the F of a SwiGLU kernel: each of its halves),
    or None if a row does not fit in registers. About 1,024-8,192 values per program, 4-16 warps."""
    block = 1 << max(0, columns - 1).bit_length()
    if block > MAX_BLOCK:
        return None
    rows = max(1, 1024 // block)
    values = block * rows
    return block, rows, 4 if values <= 1024 else 8 if values <= 4096 else 16


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the row kernels can take these tensors (2-D, unit column stride, one device where Triton runs)."""
    return not _failed and triton_can_run(tensors[0]) and all(
        t.dim() == 2 and t.stride(1) == 1 and t.device == tensors[0].device for t in tensors)


def _launch_rows(kernel_name: str, rows: int, columns: int, *args, outputs=(), **constexprs) -> bool:
    """Run one of the row kernels over `rows` rows of `columns` (`launch_settings`)."""
    block, per_program, warps = launch_settings(columns)
    return _launch(kernel_name, (-(-rows // per_program),), warps, *args, outputs=outputs, BLOCK=block,
                   ROWS=per_program, **constexprs)


def _launch(kernel_name: str, grid: tuple, warps: int, *args, outputs=(), **constexprs) -> bool:
    """Run one kernel; False (warned once, and never again) if it failed to build or launch. `outputs`: the
    positions in `args` of the e4m3 / bf16 tensors it writes (as bits under the interpreter)."""
    global _failed, launches
    try:
        module, interpreted = _kernel()
        if interpreted:
            args = [_as_bits(a) if i in outputs else a for i, a in enumerate(args)]
        getattr(module, kernel_name)[grid](*args, INTERPRETED=interpreted, num_warps=warps, **constexprs)
    except Exception as exc:  # noqa: BLE001 (a Triton build or launch failure: fall back, once, loudly)
        _failed = True
        warnings.warn(f"the Triton FP8 quantizer {kernel_name} failed ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:300]}); the FP8 experts use the torch.compile'd quantizers",
                      RuntimeWarning, stacklevel=3)
        return False
    launches += 1
    return True


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """An output as the interpreted kernels store it: its bits (see the module docstring)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)


def quantize_rows(t: torch.Tensor):
    """(e4m3 [M, K], decode scales [M] fp32) of bf16 t [M, K] (unit column stride), or None (see the docstring)."""
    if not (usable(t) and t.dtype == torch.bfloat16 and launch_settings(t.shape[1])):
        return None
    m, k = t.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=t.device)
    scale = torch.empty(m, dtype=torch.float32, device=t.device)
    if m and not _launch_rows("quantize_rows_kernel", m, k, t, q, scale, m, k, t.stride(0), q.stride(0),
                              outputs=(1,)):
        return None
    return q, scale


# quantize_columns_kernel's rows x columns per tile, and its warps: column blocks of 32 so that six trained experts'
# weights make 6 x 64 programs (fc1, K = 2,048) for an H100's 132 SMs; 32 values per thread a tile
COLUMN_TILE = (128, 32, 4)


def quantize_columns(w: torch.Tensor):
    """(e4m3 [G, K, N], decode scales [G, K]) of bf16 weights w [G, N, K] (unit K stride), one scale per (g, k)
    over N: `quantize_lastdim_reference(w.transpose(-2, -1))`, the weights' input-gradient layout; or None."""
    if _failed or not triton_can_run(w) or w.dim() != 3 or w.stride(2) != 1 or w.dtype != torch.bfloat16:
        return None
    g, n, k = w.shape
    q = torch.empty((g, k, n), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty((g, k), dtype=torch.float32, device=w.device)
    rows, columns, warps = COLUMN_TILE
    if q.numel() and not _launch("quantize_columns_kernel", (-(-k // columns), g), warps, w, q, scale, k,
                                 w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), outputs=(1,),
                                 N=n, BN=rows, BK=columns):
        return None
    return q, scale


def quantize_lastdim(t: torch.Tensor):
    """What `fp8.quantize_lastdim_reference(t)` gives, through these kernels where they apply: rows with a unit
    column stride (tokens, output gradients; contiguous weights [G, N, K] as G*N rows), or a transposed view
    [G, K, N] of weights [G, N, K] (`quantize_columns`). None otherwise."""
    if t.dim() == 2:
        return quantize_rows(t)
    if t.dim() == 3 and t.is_contiguous():
        out = quantize_rows(t.view(-1, t.shape[-1]))
        return None if out is None else (out[0].view(t.shape), out[1].view(t.shape[:-1]))
    if t.dim() == 3 and t.stride(1) == 1:
        return quantize_columns(t.transpose(1, 2))
    return None


def _swiglu_inputs_ok(h: torch.Tensor, probs: torch.Tensor, *more: torch.Tensor) -> bool:
    return (usable(h, probs, *more) and h.dtype == torch.bfloat16 and probs.dtype == torch.float32
            and probs.shape == (h.shape[0], 1) and h.shape[1] % 2 == 0
            and all(t.dtype == torch.bfloat16 and t.shape == (h.shape[0], h.shape[1] // 2) for t in more)
            and launch_settings(h.shape[1] // 2) is not None)


def swiglu_quantize(h: torch.Tensor, probs: torch.Tensor):
    """(e4m3 [M, F], decode scales [M]) of silu(gate) * up * probs for h = [gate | up] [M, 2F] bf16 and probs [M, 1]
    fp32, or None."""
    if not _swiglu_inputs_ok(h, probs):
        return None
    m, ffn = h.shape[0], h.shape[1] // 2
    q = torch.empty((m, ffn), dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty(m, dtype=torch.float32, device=h.device)
    if m and not _launch_rows("swiglu_quantize_kernel", m, ffn, h, probs, q, scale, m, ffn, h.stride(0),
                              probs.stride(0), q.stride(0), outputs=(2,)):
        return None
    return q, scale


def swiglu_backward_quantize(da: torch.Tensor, h: torch.Tensor, probs: torch.Tensor, keep: bool = False):
    """(e4m3 dh [M, 2F], decode scales [M], d_probs [M, 1] fp32) and, if `keep`, the bf16 dh, from the activation's
    gradient da [M, F] bf16, h [M, 2F] and probs [M, 1] fp32; or None."""
    if not _swiglu_inputs_ok(h, probs, da):
        return None
    m, ffn = da.shape
    q = torch.empty((m, 2 * ffn), dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty(m, dtype=torch.float32, device=h.device)
    d_probs = torch.empty((m, 1), dtype=torch.float32, device=h.device)
    dh = torch.empty((m, 2 * ffn) if keep else (0, 2 * ffn), dtype=torch.bfloat16, device=h.device)
    if m and not _launch_rows("swiglu_backward_quantize_kernel", m, ffn, da, h, probs, q, scale, d_probs, dh, m, ffn,
                              da.stride(0), h.stride(0), probs.stride(0), q.stride(0), 2 * ffn, outputs=(3, 6),
                              KEEP=keep):
        return None
    return (q, scale, d_probs, dh) if keep else (q, scale, d_probs)


def swiglu_backward_quantize_keep(da: torch.Tensor, h: torch.Tensor, probs: torch.Tensor):
    return swiglu_backward_quantize(da, h, probs, keep=True)


def compile_ahead_of_time(kernel_name: str, length: int, capability: int = 90, **constexprs):
    """One kernel compiled for compute capability 9.0 or 10.0 for rows of `length` values (the row kernels' K or F,
    with launch_settings' tiling; quantize_columns_kernel's N, with COLUMN_TILE), specialised as the JIT does for
    16-aligned pointers and strides: a triton_aot.CompiledKernel. No GPU needed."""
    from megatron_esft.experts import fp8_triton_quantize_kernels
    from megatron_esft.experts.triton_aot import compile_for

    fn = getattr(fp8_triton_quantize_kernels.load(compiled=True), kernel_name)
    if kernel_name == "quantize_columns_kernel":
        rows, columns, warps = COLUMN_TILE
        constexprs = dict(N=length, BN=rows, BK=columns, INTERPRETED=False, **constexprs)
    else:
        block, rows, warps = launch_settings(length)
        constexprs = dict(BLOCK=block, ROWS=rows, INTERPRETED=False, **constexprs)
    pointers = {"t": "*bf16", "w": "*bf16", "h": "*bf16", "da": "*bf16", "dh": "*bf16", "q": "*fp8e4nv",
                "scale": "*fp32", "probs": "*fp32", "d_probs": "*fp32"}
    runtime = [name for name in fn.arg_names if name not in constexprs]
    aligned = [name for name in runtime if name in pointers or name.startswith("stride_") or name in ("ffn", "columns")]
    return compile_for(fn, {name: pointers.get(name, "i32") for name in runtime}, constexprs,
                       divisible_by_16=aligned, num_warps=warps, capability=capability)
