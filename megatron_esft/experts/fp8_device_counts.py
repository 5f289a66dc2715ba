"""FP8 routed experts whose token counts stay on the device (EP = 1): the layout of experts/device_counts.py with the
precisions and fused kernels of experts/fp8_swiglu.py.

As in the bf16 device path, each projection is ONE grouped GEMM over all experts, here `torch._scaled_grouped_mm` on
an e4m3 stack in group order (trainable first): [E, N, K] for the forward, [E, K, N] for the input gradient, with
the decode scales stacked alike ([E, N] / [E, K]); the group offsets come from the permutation's sorted row keys, so
no count is read on the host. Per projection and layout (`FP8StackedWeights`):

* the frozen experts' quantization is the stack's tail: made by the FP8 weight cache, copied into the stack once and
  re-homed there (`FP8WeightCache.rehome`), so the frozen experts' e4m3 copies exist once, as with host counts. It
  follows the cache: a new version of the frozen weights (a checkpoint load) is quantized and copied again; with
  their bf16 weights in host memory (`--offload-frozen-experts`) it was made before they moved;
* the trained experts are quantized at every call into the stack's head (the `"all"` policy's reuse does not apply):
  a cache hit decided on the host would be replayed by a CUDA graph as it was at capture. Memory: their e4m3 copies
  in both layouts, 2 bytes per trained parameter, as much as the bf16 device path's second copy.

The rest is `fp8_swiglu._FP8SwiGLUMoE`'s, over all rows at once: the T tokens are quantized before the gather (and
the T output-gradient rows in backward), the SwiGLU kernels quantize their outputs, and the trained groups' weight
gradients are bf16 grouped GEMMs whose offsets end with the trained rows, which come first (the frozen rows after
them are never read). Row-wise and per-(expert, column) scales make every row's result independent of how rows are
grouped into GEMM calls, so results equal the host-count path's: bit for bit with the CPU's emulated FP8 GEMMs
(tests/experts/test_fp8_device_counts.py). Needs a weight cache ("frozen" or "all"; without one the stacks would
hold a frozen quantization anyway).
"""

from __future__ import annotations

import torch

from megatron_esft.experts.fp8 import FP8WeightCache
from megatron_esft.experts.fp8_swiglu import _mlp_backward, _mlp_forward, quantized_rows
from megatron_esft.experts.permutation import gather_rows, sum_pairs


class FP8StackedWeights:
    """Per (projection, layout), the e4m3 stack and its decode scales in group order (trainable, frozen)."""

    def __init__(self, cache: FP8WeightCache):
        self.cache = cache
        self._stacks: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._stacks.clear()

    def nbytes(self) -> int:
        """The stacks' bytes (their frozen tails are the cache's entries)."""
        return sum(t.numel() * t.element_size() for pair in self._stacks.values() for t in pair)

    def get(self, trainable: torch.Tensor, frozen: torch.Tensor, proj: str, layout: str, device: torch.device):
        """(e4m3 stack, decode scales) of all experts on `device`, the trained ones' quantized now."""
        n_t, n_f = trainable.shape[0], frozen.shape[0]
        if n_f == 0:
            return self.cache.quantize(trainable, layout, device)
        q_f, s_f = self.cache.get(frozen, layout, device)
        if n_t == 0:
            return q_f, s_f
        q_t, s_t = self.cache.quantize(trainable, layout, device)
        stack = self._stacks.get((proj, layout))
        if stack is None or stack[0].shape != (n_t + n_f, *q_f.shape[1:]) or stack[0].device != q_f.device:
            stack = (torch.empty((n_t + n_f, *q_f.shape[1:]), dtype=q_f.dtype, device=q_f.device),
                     torch.empty((n_t + n_f, *s_f.shape[1:]), dtype=s_f.dtype, device=s_f.device))
            self._stacks[(proj, layout)] = stack
        q, s = stack
        if q_f.data_ptr() != q[n_t:].data_ptr():  # a new quantization of the frozen experts (first use, a load)
            q[n_t:].copy_(q_f)
            s[n_t:].copy_(s_f)
            self.cache.rehome(frozen, layout, q[n_t:], s[n_t:])
        q[:n_t].copy_(q_t)
        s[:n_t].copy_(s_t)
        return q, s


class DeviceCountsFP8ExpertMLP(torch.autograd.Function):
    """tokens [T, H] bf16 -> routed output [T, H] (each token's k expert rows summed) through the FP8 SwiGLU expert
    MLP of all experts, with the group offsets on the device (module docstring). `weight(proj, layout)` gives the
    stacks; `probs` [T*k, 1] float32 in row order."""

    @staticmethod
    def forward(ctx, tokens, probs, fc1_trainable, fc2_trainable, weight, offs, n_trainable, mapping):
        token_of_row, row_of_pair, topk = mapping
        x_q, x_s = quantized_rows(tokens, token_of_row)
        y, h = _mlp_forward(x_q, x_s, probs, weight, offs)
        ctx.save_for_backward(tokens, probs, h, offs, token_of_row, row_of_pair)
        ctx.weight, ctx.n_trainable, ctx.topk = weight, n_trainable, topk
        return sum_pairs(y, row_of_pair, topk)

    @staticmethod
    def backward(ctx, grad_out):
        tokens, probs, h, offs, token_of_row, row_of_pair = ctx.saved_tensors
        n_t = ctx.n_trainable
        need_tokens, _, need_fc1, need_fc2 = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()
        dy_q, dy_s = quantized_rows(grad_out, token_of_row)  # each row's gradient is its token's
        grad_rows, d_probs, grad_fc1, grad_fc2 = _mlp_backward(
            dy_q, dy_s, lambda: gather_rows(grad_out, token_of_row), lambda: gather_rows(tokens, token_of_row),
            probs, h, ctx.weight, offs, train_fc1=bool(need_fc1 and n_t), train_fc2=bool(need_fc2 and n_t),
            wgrad_offs=offs[:n_t], need_dx=need_tokens)
        grad_tokens = sum_pairs(grad_rows, row_of_pair, ctx.topk) if need_tokens else None
        return grad_tokens, d_probs.to(probs.dtype), grad_fc1, grad_fc2, None, None, None, None


def fp8_device_counts_moe(tokens, permuted_probs, fc1_trainable, fc2_trainable, fc1_frozen, fc2_frozen,
                          stacks: FP8StackedWeights, offs, mapping) -> torch.Tensor:
    """The routed output [T, H] of all experts for tokens [T, H] bf16 (module docstring); `offs` int32 [E] ends of the
    groups' rows (trainable experts first), `permuted_probs` [T*k] float32 in row order."""
    device = tokens.device
    params = {"fc1": (fc1_trainable, fc1_frozen), "fc2": (fc2_trainable, fc2_frozen)}

    def weight(proj, layout):
        return stacks.get(*params[proj], proj, layout, device)

    return DeviceCountsFP8ExpertMLP.apply(tokens.contiguous(), permuted_probs.unsqueeze(-1), fc1_trainable,
                                          fc2_trainable, weight, offs, fc1_trainable.shape[0], mapping)
