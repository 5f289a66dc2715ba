"""Each token's k routed rows summed, `out[t] = sum_j rows[row_of_pair[t*k + j]]`, as one Triton kernel on a GPU: the
un-permutation of every MoE layer and the permutation's backward (experts/permutation.sum_pairs).

Why: torch's `embedding_bag` does this in one kernel with an fp32 accumulator, but on the H200 the 52 calls of a
27-layer ESFT step took 9.7 ms for ~6.1 GB of traffic (1.3 ms at the memory bandwidth; docs/gpu.md, "Where the time
goes"). Here one program sums one token's k rows over a block of columns: k row loads of `BLOCK` contiguous
elements, an fp32 sum in ascending j (the order of embedding_bag's loop, so the result is the same bit for bit), one
rounding, one store.

Used for 2-D rows of bf16 / fp16 / fp32 on CUDA (and on CPU under Triton's interpreter, TRITON_INTERPRET=1: tests);
elsewhere, or if the kernel cannot be compiled (a warning, once), `sum_pairs` keeps embedding_bag. Not yet measured
on a GPU: bench/bench_permutation.py times it next to embedding_bag and a gather + sum.
"""

from __future__ import annotations

import functools
import warnings

import torch

from megatron_esft.experts.triton_support import triton_can_run

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_failed = False


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted kernel, made on first use (Triton reads TRITON_INTERPRET when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def pair_sum_kernel(rows, row_of_pair, out, columns, rows_stride, out_stride, TOPK: tl.constexpr,
                        BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < columns
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            row = tl.load(row_of_pair + token * TOPK + j).to(tl.int64)
            acc += tl.load(rows + row * rows_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + token * out_stride + cols, acc.to(out.dtype.element_ty), mask=mask)

    return pair_sum_kernel, triton.next_power_of_2


def usable(rows: torch.Tensor, row_of_pair: torch.Tensor, topk: int) -> bool:
    """Whether `pair_sum` runs these inputs (else the caller keeps embedding_bag)."""
    if _failed or topk < 2 or rows.dim() != 2 or rows.dtype not in _DTYPES or rows.stride(1) != 1 \
            or row_of_pair.dtype not in (torch.int64, torch.int32) or not row_of_pair.is_contiguous():
        return False
    return triton_can_run(rows)


def pair_sum(rows: torch.Tensor, row_of_pair: torch.Tensor, topk: int) -> torch.Tensor | None:
    """[T*k] row indices, rows [N, H] -> [T, H] in rows' dtype; None if the kernel failed to build (warned once)."""
    global _failed
    tokens, columns = row_of_pair.numel() // topk, rows.shape[1]
    out = torch.empty((tokens, columns), dtype=rows.dtype, device=rows.device)
    if tokens == 0 or columns == 0:
        return out
    try:
        kernel, next_power_of_2 = _kernel()
        block = min(1024, next_power_of_2(columns))
        grid = (tokens, (columns + block - 1) // block)
        kernel[grid](rows, row_of_pair, out, columns, rows.stride(0), out.stride(0), TOPK=topk, BLOCK=block,
                     num_warps=4 if block >= 512 else 1)
    except Exception as exc:  # noqa: BLE001 (a Triton build or launch failure: fall back, once, loudly)
        _failed = True
        warnings.warn(f"the Triton pair-sum kernel failed ({type(exc).__name__}: {exc}); the MoE un-permutation "
                      "uses torch's embedding_bag", RuntimeWarning, stacklevel=2)
        return None
    return out
