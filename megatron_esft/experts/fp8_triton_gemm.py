"""A Triton row-wise-scaled FP8 grouped GEMM: the same computation and operand contract as
`torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)` in the 2-D x 3-D form the
FP8 experts use (experts/fp8.py), as a second kernel to measure against torch's.

Why: the FP8 experts target (1.4x the bf16 experts) is out of reach with torch's kernel. On the H100 its grouped FP8
GEMMs were only ~1.4x the bf16 grouped GEMMs on ESFT's shapes (~400-800 rows per expert), and by Amdahl's law over
the layer's GEMMs that caps the layer below 1.35x (docs/gpu.md). Hopper's FP8 peak is 2x bf16's, so the layer's
ceiling is set by how well the kernel handles these small groups. This kernel is tiled for them and autotuned on the
layer's (N, K, rows per group). It is selected with `fp8.set_fp8_gemm_kernel("triton")` (the trainer's
`--expert-fp8-gemm-kernel triton`, bench/gpu_esft.py's `"fp8_kernel"`). The bench's `gemm` job times it next to
torch's FP8 and bf16 kernels.

The kernel: one program per (row tile of one group, column tile). Row tiles never cross a group boundary. A program
finds its group by scanning `offs` on the device, so no host sync is needed and the launch can be captured in a CUDA
graph. The grid is sized for the worst case (cdiv(M, BM) + G row tiles), and programs past the last group's tiles
exit at once. Each program accumulates e4m3 x e4m3 products in fp32 over K (`tl.dot`: Hopper's FP8 wgmma, with
Triton's Hopper default of fast accumulation, like torch's `use_fast_accum=True`; Blackwell's tcgen05).
It then applies the row-wise decode scales, `acc * scale_a[row] * scale_b[group, column]` as torch's kernel does,
and rounds once to bf16. Rows after `offs[-1]` are not written.

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, tests only; its fp32 -> bf16 conversion
truncates where a GPU rounds to nearest even). Elsewhere, or if the kernel fails to build (warned once), the caller
keeps torch's kernel.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from megatron_esft.experts.triton_support import triton_can_run

_failed = False
launches = 0  # kernel launches so far (benchmarks report whether the kernel really ran)


def _configs(triton):
    """Autotuning candidates on a GPU: the usual Hopper FP8 tiles, and smaller row tiles for groups of a few hundred
    rows (a 128-row tile wastes up to half its work on a group's last, partial tile)."""
    shapes = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3),
              (128, 128, 64, 4, 4), (64, 64, 128, 4, 4)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in shapes]


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted (on a GPU: autotuned) kernel, made on first use (Triton reads TRITON_INTERPRET when a kernel is
    defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_grouped_mm_kernel(a, b, out, scale_a, scale_b, offs, N, stride_am, stride_bg, stride_bn, stride_sg,
                                 stride_om, ROWS_HINT, K: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                                 BN: tl.constexpr, BK: tl.constexpr):
        # both operands are K-contiguous (the kernel contract of experts/fp8.py): unit strides over K, so the tile
        # loads are contiguous 16-byte vectors that Triton can pipeline into shared memory
        pid = tl.program_id(0)
        column_tiles = tl.cdiv(N, BN)
        row_tile = pid // column_tiles
        column_tile = pid % column_tiles
        # which group's tile `row_tile` is: the groups' row tiles are numbered in group order
        zero = pid * 0
        group, row_start, row_end, before, start = zero - 1, zero, zero, zero, zero
        for g in range(G):
            end = tl.load(offs + g)
            tiles = tl.cdiv(end - start, BM)
            inside = (row_tile >= before) & (row_tile < before + tiles)
            group = tl.where(inside, g, group)
            row_start = tl.where(inside, start + (row_tile - before) * BM, row_start)
            row_end = tl.where(inside, end, row_end)
            before += tiles
            start = end
        if group < 0:  # past the last group's tiles (the grid is sized for the worst case)
            return
        rows = row_start + tl.arange(0, BM)
        columns = column_tile * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_ok = rows < row_end
        column_ok = columns < N
        a_ptrs = a + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
        b_ptrs = b + group.to(tl.int64) * stride_bg + columns.to(tl.int64)[None, :] * stride_bn + ks[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if K % BK == 0:  # decided at compile time: V2-Lite's K (2048, 1408, 2816) need no mask over K
                x = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(b_ptrs, mask=column_ok[None, :], other=0.0)
            else:
                k_ok = k0 + ks < K
                x = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(b_ptrs, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc)
            a_ptrs += BK
            b_ptrs += BK
        sa = tl.load(scale_a + rows, mask=row_ok, other=0.0)
        sb = tl.load(scale_b + group * stride_sg + columns, mask=column_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
        tl.store(out + rows.to(tl.int64)[:, None] * stride_om + columns[None, :], acc.to(tl.bfloat16),
                 mask=row_ok[:, None] & column_ok[None, :])

    if os.environ.get("TRITON_INTERPRET") == "1":  # small fixed tiles: the tests' shapes span several of each
        return scaled_grouped_mm_kernel, {"BM": 16, "BN": 32, "BK": 32}
    tuned = triton.autotune(configs=_configs(triton), key=["N", "K", "ROWS_HINT"])(scaled_grouped_mm_kernel)
    return tuned, None


def usable(a_q: torch.Tensor) -> bool:
    """Whether `scaled_grouped_mm` can run on a_q's device (else the caller keeps torch's kernel)."""
    return not _failed and triton_can_run(a_q)


def scaled_grouped_mm(a_q: torch.Tensor, b_q_t: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      offs: torch.Tensor) -> torch.Tensor | None:
    """[M, N] bf16 with rows offs[g-1]:offs[g] = (a_q rows @ b_q_t[g]) * scale_a[rows, None] * scale_b[g]: a_q [M, K]
    e4m3 row-major, b_q_t [G, K, N] e4m3 with K contiguous, scale_a [M] and scale_b [G, N] float32 decode scales,
    offs int32 [G] group ends (experts/fp8.py checks the operands first). None if the kernel failed to build (warned
    once)."""
    global _failed, launches
    m, k = a_q.shape
    g, _, n = b_q_t.shape
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a_q.device)
    if m == 0 or n == 0 or g == 0:
        return out
    try:
        kernel, fixed = _kernel()
        # the autotuning key's row count per group, rounded to a power of two (shapes only: no host sync)
        rows_hint = 1 << max(0, (m // g).bit_length() - 1)
        args = (a_q, b_q_t, out, scale_a, scale_b, offs, n, a_q.stride(0), b_q_t.stride(0), b_q_t.stride(2),
                scale_b.stride(0), out.stride(0), rows_hint)

        def grid(meta):
            return ((-(-m // meta["BM"]) + g) * -(-n // meta["BN"]),)

        if fixed is None:
            kernel[grid](*args, K=k, G=g)
        else:
            kernel[grid(fixed)](*args, K=k, G=g, **fixed)
    except Exception as exc:  # noqa: BLE001 (a Triton build or launch failure: fall back, once, loudly)
        _failed = True
        warnings.warn(f"the Triton FP8 grouped GEMM failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]});"
                      " the FP8 experts use torch._scaled_grouped_mm", RuntimeWarning, stacklevel=2)
        return None
    launches += 1
    return out


def compile_ahead_of_time(config, k: int, groups: int = 64, capability: int = 90):
    """The kernel with one autotuning `config` compiled for compute capability 9.0 or 10.0 at contraction `k`,
    specialised as the JIT specialises it at run time (experts/fp8.py's contract: 16-byte aligned operands, sizes and
    strides multiples of 16): a triton_aot.CompiledKernel. No GPU needed."""
    from megatron_esft.experts.triton_aot import compile_for

    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        kernel, _ = _kernel.__wrapped__()  # a fresh definition of the compiled kind (never the interpreter's)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    fn = kernel.fn
    pointers = {"a": "*fp8e4nv", "b": "*fp8e4nv", "out": "*bf16", "scale_a": "*fp32", "scale_b": "*fp32",
                "offs": "*i32"}
    constexprs = dict(K=k, G=groups, **config.kwargs)
    runtime = [name for name in fn.arg_names if name not in constexprs]
    return compile_for(fn, {name: pointers.get(name, "i32") for name in runtime}, constexprs,
                       divisible_by_16=runtime, num_warps=config.num_warps, num_stages=config.num_stages,
                       capability=capability)
