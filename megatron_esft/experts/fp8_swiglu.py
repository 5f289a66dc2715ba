"""The FP8 expert MLP of one group with the activation quantizations fused into the SwiGLU kernels.

`fp8_swiglu_mlp(x, probs, fc1, fc2, offs, cache)` computes, per token group g (rows offs[g-1]:offs[g]),
`y = (silu(x @ fc1_gate.T) * (x @ fc1_up.T) * probs) @ fc2.T` — SequentialMLP's expert MLP with the router
probability applied after the activation (MLP.forward's `per_token_scale`) — with the precisions of experts/fp8.py
(e4m3 row-wise scaled forward and dgrad GEMMs, bf16 wgrad for trainable weights only).

Why a fused path: chaining `fp8_grouped_mm` -> SwiGLU -> `fp8_grouped_mm` runs the activation and each quantization
as separate passes over [rows, ffn] tensors: forward writes the bf16 activation and reads it back to quantize it;
backward writes the bf16 SwiGLU input gradient and reads it back to quantize it. On an H100 those passes cost more
than the FP8 GEMMs save (docs/gpu.md). Here each is one kernel (`CompiledOnCuda`: a `torch.compile`d function):

| kernel | reads | writes |
|---|---|---|
| `swiglu_quantize` (forward) | h = fc1 output [M, 2F] bf16, probs | e4m3 activation [M, F] + row scales |
| `swiglu_backward_quantize` | h, d(activation) [M, F], probs | e4m3 dh [M, 2F] + row scales, d(probs); bf16 dh only if fc1 trains |
| `quantize_lastdim` | x [M, H], dy [M, H] | e4m3 + row scales |

Saved for backward: h and probs (and x if fc1 trains). The bf16 activation is recomputed from h only when fc2 trains
(its wgrad needs it), so a frozen group never materialises it. The activation is quantized from its fp32 value (no
intermediate bf16 rounding), so results differ from the unfused chain by e4m3 rounding ties only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_esft.experts.fp8 import (
    FP8WeightCache, CompiledOnCuda, _scaled_mm, quantize_lastdim, quantize_lastdim_reference,
)


def _swiglu_fp32(h: torch.Tensor, probs: torch.Tensor):
    gate, up = h.float().chunk(2, dim=-1)
    silu = F.silu(gate)
    return gate, up, silu, silu * up * probs


def swiglu_quantize_reference(h: torch.Tensor, probs: torch.Tensor):
    """(e4m3 [M, F], decode scale [M]) of silu(gate) * up * probs, quantized row-wise from fp32."""
    return quantize_lastdim_reference(_swiglu_fp32(h, probs)[3])


def weighted_swiglu_reference(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The bf16 activation (input of fc2's weight gradient)."""
    return _swiglu_fp32(h, probs)[3].to(h.dtype)


def _swiglu_backward(da: torch.Tensor, h: torch.Tensor, probs: torch.Tensor):
    gate, up, silu, _ = _swiglu_fp32(h, probs)
    da = da.float()
    sig = torch.sigmoid(gate)
    d_gate = da * probs * up * sig * (1 + gate * (1 - sig))
    d_up = da * probs * silu
    d_probs = (da * silu * up).sum(dim=-1, keepdim=True)
    return torch.cat((d_gate, d_up), dim=-1), d_probs


def swiglu_backward_quantize_reference(da: torch.Tensor, h: torch.Tensor, probs: torch.Tensor):
    """(e4m3 dh [M, 2F], decode scale [M], d_probs [M, 1] fp32) for a frozen fc1 (no bf16 dh needed)."""
    dh, d_probs = _swiglu_backward(da, h, probs)
    q, s = quantize_lastdim_reference(dh)
    return q, s, d_probs


def swiglu_backward_quantize_keep_reference(da: torch.Tensor, h: torch.Tensor, probs: torch.Tensor):
    """As above plus the bf16 dh (input of a trainable fc1's weight gradient)."""
    dh, d_probs = _swiglu_backward(da, h, probs)
    q, s = quantize_lastdim_reference(dh)
    return q, s, d_probs, dh.to(h.dtype)


swiglu_quantize = CompiledOnCuda(swiglu_quantize_reference)
weighted_swiglu = CompiledOnCuda(weighted_swiglu_reference)
# the first argument is the one whose rows vary (CompiledOnCuda marks dim 0 of it dynamic)
swiglu_backward_quantize = CompiledOnCuda(swiglu_backward_quantize_reference)
swiglu_backward_quantize_keep = CompiledOnCuda(swiglu_backward_quantize_keep_reference)


class _FP8SwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, fc1, fc2, offs, cache):
        ctx.cache = cache
        x_q, x_s = quantize_lastdim(x)
        w1_q, w1_s = cache.get(fc1, "nk")
        h = _scaled_mm(x_q, w1_q.transpose(-2, -1), x_s, w1_s, offs)
        a_q, a_s = swiglu_quantize(h, probs)
        w2_q, w2_s = cache.get(fc2, "nk")
        y = _scaled_mm(a_q, w2_q.transpose(-2, -1), a_s, w2_s, offs)
        ctx.save_for_backward(x if fc1.requires_grad else None, probs, h, fc1, fc2, offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, probs, h, fc1, fc2, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dy_q, dy_s = quantize_lastdim(dy)
        w2t_q, w2t_s = ctx.cache.get(fc2, "kn")
        da = _scaled_mm(dy_q, w2t_q.transpose(-2, -1), dy_s, w2t_s, offs)
        grad_fc2 = grad_fc1 = None
        if fc2.requires_grad:
            grad_fc2 = torch._grouped_mm(dy.t(), weighted_swiglu(h, probs), offs=offs)
        if fc1.requires_grad:
            dh_q, dh_s, d_probs, dh = swiglu_backward_quantize_keep(da, h, probs)
            grad_fc1 = torch._grouped_mm(dh.t(), x, offs=offs)
        else:
            dh_q, dh_s, d_probs = swiglu_backward_quantize(da, h, probs)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w1t_q, w1t_s = ctx.cache.get(fc1, "kn")
            grad_x = _scaled_mm(dh_q, w1t_q.transpose(-2, -1), dh_s, w1t_s, offs)
        return grad_x, d_probs.to(probs.dtype), grad_fc1, grad_fc2, None, None


def fp8_swiglu_mlp(x: torch.Tensor, probs: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, offs: torch.Tensor,
                   cache: FP8WeightCache) -> torch.Tensor:
    """The group's expert MLP output [M, H] bf16 (see the module docstring). x [M, H] bf16 with M == offs[-1] > 0,
    probs [M] float32, fc1 [G, 2F, H] and fc2 [G, H, F] bf16 with H and F multiples of 16."""
    if x.dtype != torch.bfloat16 or fc1.dtype != torch.bfloat16 or fc2.dtype != torch.bfloat16:
        raise ValueError(f"fp8 experts need bf16 activations and weights, got {x.dtype} / {fc1.dtype} / {fc2.dtype}")
    if x.shape[0] == 0:
        raise ValueError("fp8_swiglu_mlp needs at least one row (the caller skips empty groups)")
    return _FP8SwiGLUMLP.apply(x, probs.unsqueeze(-1), fc1, fc2, offs, cache)
