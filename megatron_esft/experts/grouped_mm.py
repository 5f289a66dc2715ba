"""Grouped GEMM primitives for the frozen-aware experts: `torch._grouped_mm` with a per-expert loop fallback.

Facts this relies on (reference: /work/shared/reference/grouped_gemm.md §2):
* `torch._grouped_mm(x [M, K], w_t [G, K, N], offs int32 [G])` computes `x[s:e] @ w_t[g]` for each group, with
  `offs` the inclusive end rows (no leading 0). Its autograd formula has separate input and weight branches: when the
  weight does not require grad the weight-gradient GEMM is not run and `x` is not saved.
* Runs on CPU (torch >= 2.9, fp32/bf16/fp16) and CUDA; every operand's leading stride must be a multiple of 16 bytes,
  so K and N must be multiples of 16 / element size. Otherwise we fall back to a loop of `F.linear` per expert.
* The backward needs a dense, 16-byte aligned output gradient (an expanded grad from `.sum()` fails), so every output
  passes through `contiguous_grad`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PROBE_CACHE: dict[tuple, bool] = {}
_CAPABILITY_CACHE: dict[tuple, tuple[int, int]] = {}
_LOGGED: set[tuple] = set()


class _ContiguousGrad(torch.autograd.Function):
    """Identity in forward; makes the incoming gradient dense in backward (grouped GEMM backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # `is_contiguous()` is also true for empty or size-1 expanded grads whose strides are 0; the kernel's stride
        # check is stricter, so compare with the canonical strides.
        if grad.stride() != _canonical_strides(grad.shape):
            grad = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)
        return grad


def _canonical_strides(shape) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def _run_probe(dtype: torch.dtype, device: torch.device, k: int, n: int) -> None:
    """Forward + backward of a tiny grouped GEMM with the real K, N, dtype and device (raises if unsupported)."""
    x = torch.zeros(3, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.zeros(2, n, k, dtype=dtype, device=device, requires_grad=True)
    offs = torch.tensor([1, 3], dtype=torch.int32, device=device)
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    y.backward(torch.ones(3, n, dtype=dtype, device=device))


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, k: int, n: int) -> bool:
    """Whether `torch._grouped_mm` runs forward+backward for [*, k] x [G, k, n] here (probed once per key, cached)."""
    key = (dtype, device.type, k, n)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    reason = None
    if not hasattr(torch, "_grouped_mm"):
        reason = f"torch {torch.__version__} has no torch._grouped_mm"
    elif dtype not in _SUPPORTED_DTYPES:
        reason = f"dtype {dtype} is not supported by torch._grouped_mm"
    elif (k * torch.finfo(dtype).bits // 8) % 16 or (n * torch.finfo(dtype).bits // 8) % 16:
        reason = f"K={k} or N={n} rows are not 16-byte aligned for {dtype}"
    else:
        try:
            with torch.enable_grad():
                _run_probe(dtype, device, k, n)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no kernel for this device
            reason = f"probe failed: {' '.join(str(exc).split())[:200]}"
    _PROBE_CACHE[key] = reason is None
    if reason is not None and key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("frozen-aware experts: per-expert loop instead of torch._grouped_mm (%s)", reason)
    return reason is None


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """`torch.cuda.get_device_capability(device)`, looked up once per device: the experts ask on every MoE layer's
    forward and backward, and each lookup goes through torch's lazy-init and device-properties calls. Keyed by the
    lookup function as well, so a test that patches `torch.cuda.get_device_capability` is never answered from a
    real device's (or another patch's) entry."""
    lookup = torch.cuda.get_device_capability
    key = (lookup, device.index)
    if key not in _CAPABILITY_CACHE:
        _CAPABILITY_CACHE[key] = tuple(lookup(device))
    return _CAPABILITY_CACHE[key]


def grouped_mm_takes_device_offsets(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `torch._grouped_mm` runs as one kernel that reads its group offsets on the device. On CUDA only bf16 on
    compute capability 9.x / 10.x does (H100/H200, B200: aten's GroupedBlas.cpp `_grouped_mm_cuda`); otherwise
    (fp32, fp16, other GPUs) torch's fallback copies the offsets to the host and loops over the groups, a sync per
    call. On a CPU that copy is no sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return dtype == torch.bfloat16 and cuda_capability(device)[0] in (9, 10)


def empty_groups_get_unwritten_wgrad(device: torch.device) -> bool:
    """Whether `torch._grouped_mm`'s weight gradient (2D x 2D, groups along the rows) may be non-zero for a group
    without rows: reported for Blackwell (compute capability 10.x, pytorch/pytorch#172439, open); Hopper's and the
    CPU's are exact zeros. ESFT needs them zero: a trained expert that got no tokens in a micro-batch must get no
    update from it."""
    device = torch.device(device)
    return device.type == "cuda" and cuda_capability(device)[0] == 10


def zero_empty_groups(grad_w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The weight gradient `grad_w` [G, ...] of a grouped GEMM with the groups that have no rows (equal consecutive
    `offs`) set to exact zeros where the kernel does not guarantee it (`empty_groups_get_unwritten_wgrad`); on the
    device, without a host sync. Elsewhere `grad_w` itself."""
    if not empty_groups_get_unwritten_wgrad(grad_w.device):
        return grad_w
    empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
    return grad_w.masked_fill(empty.view(-1, *(1,) * (grad_w.dim() - 1)), 0)


class _ZeroEmptyGroupGrads(torch.autograd.Function):
    """Identity on a [G, ...] weight whose gradient passes through `zero_empty_groups`."""

    @staticmethod
    def forward(ctx, weight, offs):
        ctx.save_for_backward(offs)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (offs,) = ctx.saved_tensors
        return zero_empty_groups(grad, offs), None


def with_zero_grads_of_empty_groups(weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`weight` for a grouped GEMM whose autograd computes the weight gradient (torch._grouped_mm's own backward):
    where empty groups may get a non-zero gradient, a view whose gradient is masked with `zero_empty_groups`."""
    if weight.requires_grad and empty_groups_get_unwritten_wgrad(weight.device):
        return _ZeroEmptyGroupGrads.apply(weight, offs)
    return weight


def to_device_async(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a stream synchronization: PyTorch synchronizes the stream after a
    blocking host-to-device copy (`.to(device)`, `torch.tensor(..., device=cuda)`), so the copy goes from pinned memory
    with `non_blocking=True` (the caching host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda" or values.device == device:
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def group_offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """The `offs` of `torch._grouped_mm` (int32 inclusive group ends) for host row counts, on `device` without a
    stream synchronization (to_device_async)."""
    return to_device_async(torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32), device)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[s:e] = x[s:e] @ weight[g].T for each group g; weight is nn.Linear style [G, N, K]; offs int32 inclusive ends.

    The caller guarantees offs[-1] == x.shape[0] (rows past offs[-1] would be left uninitialised by the kernel).
    """
    out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    return contiguous_grad(out)


def looped_mm(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Reference/fallback: one F.linear per group. Always touches every group's weight (so a trainable weight gets a
    zero-filled grad even with zero tokens, as with the grouped GEMM)."""
    outs = [F.linear(chunk, weight[g]) for g, chunk in enumerate(torch.split(x, list(counts)))]
    if not outs:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(outs, dim=0)
