"""FP8 (e4m3, row-wise scaled) grouped GEMMs for the frozen-aware experts, with an ESFT-shaped backward.

`fp8_grouped_mm(x [M, K] bf16, weight [G, N, K] bf16, offs int32 [G], cache)` computes, per group g,
`y[s:e] = x[s:e] @ weight[g].T` like `grouped_mm.grouped_mm`, with these precisions (H100, `torch._scaled_grouped_mm`):

| GEMM | operands | scaling | accumulate / output |
|---|---|---|---|
| forward `x @ w.T` | e4m3 x, e4m3 w | one scale per token row of x (amax over K); one per (expert, output column) of w | fp32 (`use_fast_accum`) -> bf16 |
| dgrad `dy @ w` | e4m3 dy, e4m3 w | one scale per row of dy (amax over N); one per (expert, input column) of w | fp32 (`use_fast_accum`) -> bf16 |
| wgrad `dy.T @ x` (trainable groups only) | bf16 dy, bf16 x | none | `torch._grouped_mm`, bf16 out |

Why this split:
* the weight gradient stays in bf16 (TorchAO's "wgrad with high precision" idea): ESFT trains ~10 % of the experts, so
  wgrad is a small share of the work, and bf16 needs no token-group padding (FP8 wgrad contracts over the token
  dimension, whose group boundaries would have to be multiples of 16). Forward and dgrad contract over K / N, so the
  token groups need no padding and no host sync is added;
* a frozen weight (`requires_grad=False`) gets no wgrad and its input is not saved (only the weight is referenced);
* scales are "amax -> 448" per row, computed fresh every call (current scaling, no amax history), decode scales are
  passed to the kernel as float32 reciprocals. Rows that are all zero get scale 1 (exact zeros).

Weights are quantized in two physical layouts (FP8 tensor-core GEMMs need both operands K-major): [G, N, K] for the
forward and [G, K, N] for dgrad. `FP8WeightCache` keeps them while the weight is unchanged (key: the weight object,
weakly referenced, and its autograd version counter, which the optimizer's in-place update bumps): `policy="frozen"`
caches only frozen weights (2 bytes per frozen parameter: the same as their bf16 copy), `"all"` every weight, `"none"`
re-quantizes every call. A weight may live in another memory than the GEMM (frozen experts offloaded to host memory,
`FrozenAwareGroupedExperts.offload_frozen_weights`): its quantization is made on the compute device from a copy.

On CPU (no `_scaled_grouped_mm` kernel) the scaled GEMM is emulated exactly from the same e4m3 values and scales in
float32 — for the CPU tests of the quantization and autograd plumbing only; the real kernel is checked on the GPU by
bench/gpu_esft.py's `check` job and the GPU-only tests. The expert MLP with plain SwiGLU does not chain two of these
GEMMs: experts/fp8_swiglu.py fuses the activation's quantization into the SwiGLU kernels.
"""

from __future__ import annotations

import logging
import weakref

import torch

from megatron_esft.experts import fp8_triton_gemm, fp8_triton_quantize
from megatron_esft.experts.grouped_mm import cuda_capability, zero_empty_groups

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
CACHE_POLICIES = ("none", "frozen", "all")


def quantize_lastdim_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization along the last dim: (q contiguous, decode scale float32 [...]) with
    t ≈ q.float() * scale[..., None]. `t` may be a transposed view (the result is laid out contiguously)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, FP8_MAX / amax, torch.ones_like(amax))
    q = (t.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale.reciprocal().squeeze(-1).contiguous()


FP8_QUANTIZERS = ("inductor", "triton")
_quantizer = "inductor"


def set_fp8_quantizer(quantizer: str) -> None:
    """Which kernels quantize the FP8 experts' activations and weights: "inductor" (`CompiledOnCuda`: torch.compile's,
    the default) or "triton" (the hand-written kernels of experts/fp8_triton_quantize.py, where they apply).
    Process-wide, like `set_fp8_gemm_kernel`: set it before the first step."""
    global _quantizer
    _quantizer = _one_of("fp8 quantizer", quantizer, FP8_QUANTIZERS)


def fp8_quantizer() -> str:
    return _quantizer


def _one_of(what: str, value: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{what} {value!r}: choose from {', '.join(choices)}")
    return value


class CompiledOnCuda:
    """`reference` as one `torch.compile`d (Triton) kernel for CUDA tensors, eager elsewhere; falls back to eager
    for good (with a warning) if compilation fails. Only dim 0 of the first argument (rows: tokens of a group) varies
    between calls (and dim 0 of every other argument with as many rows), so the row length stays static and Inductor
    specialises the reduction for it. `hand_written`: the same function as a hand-written kernel
    (experts/fp8_triton_quantize.py, returning None where it does not apply), used instead with
    `set_fp8_quantizer("triton")`."""

    def __init__(self, reference, hand_written=None):
        self.reference = reference
        self.hand_written = hand_written
        self._compiled = None
        self._failed = False

    def __call__(self, t: torch.Tensor, *args):
        if self.hand_written is not None and _quantizer == "triton":
            out = self.hand_written(t, *args)
            if out is not None:
                return out
        if t.device.type != "cuda" or t.numel() == 0 or self._failed:
            return self.reference(t, *args)
        return self.compiled(t, *args)

    def compiled(self, t: torch.Tensor, *args):
        """The compiled kernel on any device (the CPU tests run exactly this path through Inductor's C++ backend:
        a graph break, or a row count that the compiled code specialises on, shows up there as `_failed`)."""
        if self._failed:
            return self.reference(t, *args)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.reference)
            if t.shape[0] >= 2:
                for arg in (t, *args):
                    if torch.is_tensor(arg) and arg.dim() and arg.shape[0] == t.shape[0]:
                        torch._dynamo.mark_dynamic(arg, 0)
            return self._compiled(t, *args)
        except Exception as exc:  # noqa: BLE001 - any compile-stack failure (no Triton, ...): eager is correct
            self._failed = True
            logger.warning("fp8: compiling %s failed (%s); eager ops instead", self.reference.__name__,
                           " ".join(str(exc).split())[:200])
            return self.reference(t, *args)


quantize_lastdim = CompiledOnCuda(quantize_lastdim_reference, fp8_triton_quantize.quantize_lastdim)


def scaled_grouped_mm_supported(device: torch.device) -> bool:
    """Row-wise FP8 grouped GEMM kernels exist for CUDA compute capability 9.0 / 10.0 (torch >= 2.8)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    return cuda_capability(device) in ((9, 0), (10, 0))


def _check_kernel_contract(a_q, b_q_t, scale_a, scale_b, offs) -> None:
    """What `torch._scaled_grouped_mm`'s CUDA kernel checks of its operands (aten ScaledGroupMM / GroupedMMUtils; the
    layouts validated on an H200): checked on the CPU too, so that a layout change fails the CPU tests, not a GPU
    run."""
    m, k = a_q.shape
    g, _, n = b_q_t.shape
    problems = [
        (a_q.dtype == FP8_DTYPE and b_q_t.dtype == FP8_DTYPE, "e4m3 operands"),
        (a_q.stride(1) == 1, "a row-major (K contiguous)"),
        (b_q_t.shape[1] == k and b_q_t.stride(1) == 1, "b [G, K, N] column-major (K contiguous per column)"),
        (k % 16 == 0 and n % 16 == 0, "K and N multiples of 16"),
        (a_q.data_ptr() % 16 == 0 and b_q_t.data_ptr() % 16 == 0, "16-byte aligned operands"),
        (scale_a.dtype == torch.float32 and scale_a.shape == (m,) and scale_a.is_contiguous(),
         "scale_a float32 [M] contiguous"),
        (scale_b.dtype == torch.float32 and scale_b.shape == (g, n) and scale_b.stride(1) == 1,
         "scale_b float32 [G, N] with unit column stride"),
        (offs.dtype == torch.int32 and offs.shape == (g,), "offs int32 [G]"),
    ]
    failed = [what for ok, what in problems if not ok]
    if failed:
        raise ValueError(f"_scaled_grouped_mm operands break the CUDA kernel's contract: {', '.join(failed)}")


def _emulated_scaled_grouped_mm(a_q, b_q_t, scale_a, scale_b, offs):
    """float32 emulation of `torch._scaled_grouped_mm` (2D x 3D, row-wise scales) from the same e4m3 values, after
    the kernel's own checks of the operands."""
    _check_kernel_contract(a_q, b_q_t, scale_a, scale_b, offs)
    a = a_q.float() * scale_a[:, None]
    b = b_q_t.float() * scale_b[:, None, :]  # b_q_t [G, K, N], scale_b [G, N]
    return torch._grouped_mm(a, b, offs=offs).to(torch.bfloat16)


FP8_GEMM_KERNELS = ("torch", "triton")
_gemm_kernel = "torch"


def set_fp8_gemm_kernel(kernel: str) -> None:
    """Which kernel runs the FP8 grouped GEMMs: "torch" (`torch._scaled_grouped_mm`, the default) or "triton"
    (experts/fp8_triton_gemm.py; where Triton cannot run it, torch's kernel or the CPU emulation). Process-wide, like
    torch's own backend switches: set it before the first step (a CUDA graph keeps the kernel it captured)."""
    global _gemm_kernel
    _gemm_kernel = _one_of("fp8 GEMM kernel", kernel, FP8_GEMM_KERNELS)


def fp8_gemm_kernel() -> str:
    return _gemm_kernel


def _scaled_mm(a_q, b_q_t, scale_a, scale_b, offs):
    if _gemm_kernel == "triton":
        if fp8_triton_gemm.usable(a_q):
            _check_kernel_contract(a_q, b_q_t, scale_a, scale_b, offs)  # the same operands as torch's kernel
            out = fp8_triton_gemm.scaled_grouped_mm(a_q, b_q_t, scale_a, scale_b, offs)
            if out is not None:
                return out
    if a_q.device.type == "cuda":
        return torch._scaled_grouped_mm(a_q, b_q_t, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)
    return _emulated_scaled_grouped_mm(a_q, b_q_t, scale_a, scale_b, offs)


class FP8WeightCache:
    """Quantized copies of expert weights, reused while the weight is unchanged (see the module docstring)."""

    def __init__(self, policy: str = "frozen"):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"fp8 weight cache policy {policy!r}: choose from {', '.join(CACHE_POLICIES)}")
        self.policy = policy
        self._entries: dict[tuple, tuple] = {}
        self.quantizations = 0  # how many weight quantizations ran (tests / benchmarks read it)

    def quantize(self, weight: torch.Tensor, layout: str, device: torch.device):
        """A fresh quantization of `weight` in `layout` (see `get`) on `device`, whatever the policy."""
        self.quantizations += 1
        g, n, k = weight.shape
        w = weight.detach()
        if w.device != device:  # a weight kept in host memory (frozen experts offloaded): quantized on the device
            w = w.to(device, non_blocking=True)
        if layout == "nk":  # forward operand: rows (g, n) over K
            q, s = quantize_lastdim(w)
            return q.view(g, n, k), s.view(g, n)
        q, s = quantize_lastdim(w.transpose(-2, -1))  # dgrad operand: rows (g, k) over N
        return q.view(g, k, n), s.view(g, k)

    def get(self, weight: torch.Tensor, layout: str, device=None):
        """(q, decode scale) on `device` (default: the weight's): layout "nk" -> q [G, N, K], scale [G, N];
        "kn" -> q [G, K, N], scale [G, K]."""
        device = weight.device if device is None else torch.device(device)
        use = self.policy == "all" or (self.policy == "frozen" and not weight.requires_grad)
        if not use:
            return self.quantize(weight, layout, device)
        # keyed by the weight object itself (a weak reference: a freed weight's memory, reused by a new tensor of
        # the same shape, must not find the old quantization) and its autograd version (bumped by in-place updates)
        key = (id(weight), layout)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == weight._version:
            return hit[2], hit[3]
        q, s = self.quantize(weight, layout, device)
        self._entries[key] = (weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None)), weight._version,
                              q, s)
        return q, s

    def rehome(self, weight: torch.Tensor, layout: str, q: torch.Tensor, s: torch.Tensor) -> None:
        """Let the cached quantization of `weight` in `layout` be (q, s), equal copies of it elsewhere (the tail of
        experts/fp8_device_counts.py's stacks): the cache's own copy is freed, and the next `get` returns (q, s)."""
        key = (id(weight), layout)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is weight:
            self._entries[key] = (hit[0], hit[1], q, s)

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() + s.numel() * 4 for _, _, q, s in self._entries.values())


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offs, cache):
        g, n, k = weight.shape
        ctx.cache = cache
        ctx.save_for_backward(x if weight.requires_grad else None, weight, offs)
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        x_q, x_s = quantize_lastdim(x)
        w_q, w_s = cache.get(weight, "nk", x.device)
        return _scaled_mm(x_q, w_q.transpose(-2, -1), x_s, w_s, offs)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if grad.shape[0] == 0:
                grad_x = grad.new_zeros(0, weight.shape[2])
            else:
                g_q, g_s = quantize_lastdim(grad)
                wt_q, wt_s = ctx.cache.get(weight, "kn", grad.device)
                grad_x = _scaled_mm(g_q, wt_q.transpose(-2, -1), g_s, wt_s, offs)
        if ctx.needs_input_grad[1]:
            # bf16 wgrad, [G, N, K] in the parameter's own layout; an empty group gets exact zeros
            grad_w = zero_empty_groups(torch._grouped_mm(grad.t(), x, offs=offs), offs)
        return grad_x, grad_w, None, None


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, cache: FP8WeightCache) -> torch.Tensor:
    """y[s:e] = x[s:e] @ weight[g].T with FP8 forward/dgrad and bf16 wgrad (see the module docstring).

    x [M, K] bf16 with M == offs[-1]; weight [G, N, K] bf16; K and N multiples of 16."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"fp8 experts need bf16 activations and weights, got {x.dtype} / {weight.dtype}")
    if x.shape[1] % 16 or weight.shape[1] % 16:
        raise ValueError(f"fp8 experts need K and N multiples of 16, got K={x.shape[1]}, N={weight.shape[1]}")
    return _FP8GroupedMM.apply(x, weight, offs, cache)
