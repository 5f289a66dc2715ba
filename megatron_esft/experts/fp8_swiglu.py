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

from megatron_esft.experts import fp8_triton_quantize
from megatron_esft.experts.fp8 import (
    FP8WeightCache, CompiledOnCuda, _scaled_mm, quantize_lastdim, quantize_lastdim_reference,
)
from megatron_esft.experts.grouped_mm import group_offsets, zero_empty_groups
from megatron_esft.experts.permutation import gather_rows, sum_pairs


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


swiglu_quantize = CompiledOnCuda(swiglu_quantize_reference, fp8_triton_quantize.swiglu_quantize)
weighted_swiglu = CompiledOnCuda(weighted_swiglu_reference)
# the first argument is the one whose rows vary (CompiledOnCuda marks dim 0 of it dynamic)
swiglu_backward_quantize = CompiledOnCuda(swiglu_backward_quantize_reference,
                                          fp8_triton_quantize.swiglu_backward_quantize)
swiglu_backward_quantize_keep = CompiledOnCuda(swiglu_backward_quantize_keep_reference,
                                               fp8_triton_quantize.swiglu_backward_quantize_keep)


def _mlp_forward(x_q, x_s, probs, weight, offs):
    """(y, h) of rows grouped by `offs` from their quantized input; `weight(proj, layout)` gives the groups' e4m3
    weights and decode scales (FP8WeightCache.get's layouts)."""
    w1_q, w1_s = weight("fc1", "nk")
    h = _scaled_mm(x_q, w1_q.transpose(-2, -1), x_s, w1_s, offs)
    a_q, a_s = swiglu_quantize(h, probs)
    w2_q, w2_s = weight("fc2", "nk")
    return _scaled_mm(a_q, w2_q.transpose(-2, -1), a_s, w2_s, offs), h


def _mlp_backward(dy_q, dy_s, dy_rows, x_rows, probs, h, weight, offs, *, train_fc1, train_fc2, wgrad_offs, need_dx):
    """(dx rows or None, d_probs [M, 1] fp32, grad fc1, grad fc2) from the rows' quantized output gradient.
    `dy_rows()` / `x_rows()` give the bf16 rows the weight gradients need (called only for trained weights), whose
    groups end at `wgrad_offs` (the rows after its last end are not read)."""
    w2t_q, w2t_s = weight("fc2", "kn")
    da = _scaled_mm(dy_q, w2t_q.transpose(-2, -1), dy_s, w2t_s, offs)
    grad_fc2 = grad_fc1 = grad_x = None
    if train_fc2:
        grad_fc2 = zero_empty_groups(torch._grouped_mm(dy_rows().t(), weighted_swiglu(h, probs), offs=wgrad_offs),
                                     wgrad_offs)
    if train_fc1:
        dh_q, dh_s, d_probs, dh = swiglu_backward_quantize_keep(da, h, probs)
        grad_fc1 = zero_empty_groups(torch._grouped_mm(dh.t(), x_rows(), offs=wgrad_offs), wgrad_offs)
    else:
        dh_q, dh_s, d_probs = swiglu_backward_quantize(da, h, probs)
    if need_dx:
        w1t_q, w1t_s = weight("fc1", "kn")
        grad_x = _scaled_mm(dh_q, w1t_q.transpose(-2, -1), dh_s, w1t_s, offs)
    return grad_x, d_probs, grad_fc1, grad_fc2


def quantized_rows(tokens: torch.Tensor, token_of_row: torch.Tensor):
    """(e4m3 rows, decode scales) of `tokens[token_of_row]`: row-wise scales depend on the row alone, so each token is
    quantized once and its e4m3 bytes and scale are gathered (T rows quantized instead of T*k, 1-byte rows moved)."""
    t_q, t_s = quantize_lastdim(tokens)
    return gather_rows(t_q, token_of_row), t_s.index_select(0, token_of_row)


def _cached(fc1, fc2, cache, device):
    """`weight(proj, layout)` of one group's Parameters through the FP8 weight cache."""
    return lambda proj, layout: cache.get(fc1 if proj == "fc1" else fc2, layout, device)


def _group_backward(dy_q, dy_s, dy_rows, x_rows, probs, h, fc1, fc2, offs, cache, need_dx):
    return _mlp_backward(dy_q, dy_s, dy_rows, x_rows, probs, h, _cached(fc1, fc2, cache, dy_q.device), offs,
                         train_fc1=fc1.requires_grad, train_fc2=fc2.requires_grad, wgrad_offs=offs, need_dx=need_dx)


class _FP8SwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, fc1, fc2, offs, cache):
        ctx.cache = cache
        x_q, x_s = quantize_lastdim(x)
        y, h = _mlp_forward(x_q, x_s, probs, _cached(fc1, fc2, cache, x.device), offs)
        ctx.save_for_backward(x if fc1.requires_grad else None, probs, h, fc1, fc2, offs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, probs, h, fc1, fc2, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dy_q, dy_s = quantize_lastdim(dy)
        grad_x, d_probs, grad_fc1, grad_fc2 = _group_backward(
            dy_q, dy_s, lambda: dy, lambda: x, probs, h, fc1, fc2, offs, ctx.cache, ctx.needs_input_grad[0])
        return grad_x, d_probs.to(probs.dtype), grad_fc1, grad_fc2, None, None


def fp8_swiglu_mlp(x: torch.Tensor, probs: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, offs: torch.Tensor,
                   cache: FP8WeightCache) -> torch.Tensor:
    """The group's expert MLP output [M, H] bf16 (see the module docstring). x [M, H] bf16 with M == offs[-1] > 0,
    probs [M] float32, fc1 [G, 2F, H] and fc2 [G, H, F] bf16 with H and F multiples of 16."""
    _check_bf16(x, fc1, fc2)
    if x.shape[0] == 0:
        raise ValueError("fp8_swiglu_mlp needs at least one row (the caller skips empty groups)")
    return _FP8SwiGLUMLP.apply(x, probs.unsqueeze(-1), fc1, fc2, offs, cache)


def _check_bf16(x, *weights):
    if x.dtype != torch.bfloat16 or any(w.dtype != torch.bfloat16 for w in weights):
        raise ValueError(f"fp8 experts need bf16 activations and weights, got {x.dtype} / "
                         f"{' / '.join(str(w.dtype) for w in weights)}")


class _FP8SwiGLUMoE(torch.autograd.Function):
    """tokens [T, H] -> routed output [T, H] of one MoE layer's expert groups (fp8_swiglu_moe)."""

    @staticmethod
    def forward(ctx, tokens, probs, token_of_row, row_of_pair, topk, rows, offs, cache, *weights):
        ctx.cache, ctx.topk, ctx.rows, ctx.offs = cache, topk, rows, offs
        x_q, x_s = quantized_rows(tokens, token_of_row)
        ys, hs, start = [], [], 0
        for g, n in enumerate(rows):
            if n == 0:
                hs.append(None)
                continue
            part = slice(start, start + n)
            # a group's scales start at any row: copied to a fresh (aligned) buffer, as the kernel gets them in the
            # rows path (a few bytes per row); the e4m3 rows start at a multiple of H (16) bytes
            y, h = _mlp_forward(x_q[part], x_s[part].clone(), probs[part],
                                _cached(weights[2 * g], weights[2 * g + 1], cache, tokens.device), offs[g])
            ys.append(y)
            hs.append(h)
            start += n
        if not ys:
            y = tokens.new_zeros(0, tokens.shape[1])
        else:
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
        any_fc1_trains = any(w.requires_grad for w in weights[0::2])
        ctx.save_for_backward(tokens if any_fc1_trains else None, probs, token_of_row, row_of_pair, *hs, *weights)
        return sum_pairs(y, row_of_pair, topk)

    @staticmethod
    def backward(ctx, d_out):
        tokens, probs, token_of_row, row_of_pair, *rest = ctx.saved_tensors
        groups = len(ctx.rows)
        hs, weights = rest[:groups], rest[groups:]
        d_out = d_out.contiguous()
        # the output gradient of each row is its token's (the un-permutation is a plain sum): quantized per token too
        dy_q, dy_s = quantized_rows(d_out, token_of_row)
        need_dx = ctx.needs_input_grad[0]
        dxs, d_probs, grads, start = [], [], [], 0
        for g, n in enumerate(ctx.rows):
            fc1, fc2 = weights[2 * g], weights[2 * g + 1]
            if n == 0:  # a trainable group without tokens still gets a (zero) gradient, as with the grouped GEMM
                grads += [torch.zeros_like(w) if w.requires_grad else None for w in (fc1, fc2)]
                continue
            part = slice(start, start + n)
            index = token_of_row[part]
            dx, dp, grad_fc1, grad_fc2 = _group_backward(
                dy_q[part], dy_s[part].clone(), lambda: d_out.index_select(0, index),
                lambda: tokens.index_select(0, index), probs[part], hs[g], fc1, fc2, ctx.offs[g], ctx.cache, need_dx)
            dxs.append(dx)
            d_probs.append(dp)
            grads += [grad_fc1, grad_fc2]
            start += n
        d_tokens = None
        if need_dx:
            dx_rows = torch.cat(dxs, dim=0) if len(dxs) != 1 else dxs[0]
            d_tokens = sum_pairs(dx_rows, row_of_pair, ctx.topk) if dxs else torch.zeros_like(d_out)
        d_probs = (torch.cat(d_probs, dim=0) if d_probs else probs.new_zeros(0, 1)).to(probs.dtype)
        return (d_tokens, d_probs, None, None, None, None, None, None, *grads)


def fp8_swiglu_moe(tokens: torch.Tensor, permuted_probs: torch.Tensor, groups, mapping,
                   cache: FP8WeightCache) -> torch.Tensor:
    """The routed output [T, H] of a layer's expert groups for tokens [T, H] bf16: the FP8 expert MLP of
    `fp8_swiglu_mlp` on the rows of `mapping` (experts/permutation.token_mapping: (token_of_row, row_of_pair, topk),
    rows in the groups' order), each token's k rows summed. `groups`: [(fc1 [G, 2F, H], fc2 [G, H, F], per-expert
    row counts)] in row order; `permuted_probs` [T*k] float32 in row order. Quantizes the T tokens (and, backward,
    the T output-gradient rows) once instead of the T*k permuted rows; equals permute -> `fp8_swiglu_mlp` per group
    -> un-permute (the same e4m3 values and scales)."""
    _check_bf16(tokens, *(w for fc1, fc2, _ in groups for w in (fc1, fc2)))
    token_of_row, row_of_pair, topk = mapping
    device = tokens.device
    rows = tuple(int(sum(counts)) for _, _, counts in groups)
    offs = tuple(group_offsets(counts, device) for _, _, counts in groups)
    weights = [w for fc1, fc2, _ in groups for w in (fc1, fc2)]
    return _FP8SwiGLUMoE.apply(tokens.contiguous(), permuted_probs.unsqueeze(-1), token_of_row, row_of_pair, topk,
                               rows, offs, cache, *weights)
