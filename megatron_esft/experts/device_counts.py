"""Routed experts whose token counts stay on the device: no host synchronization, static shapes (EP = 1; bf16 here,
FP8 in experts/fp8_device_counts.py).

The default grouped experts need each expert's token count on the host: the trainable and the frozen group are two
Parameters, hence two grouped GEMMs, and the frozen group's rows start where the trainable group's end, a
data-dependent row that a tensor view can only take from the host. Megatron's dispatcher therefore copies the counts
to the host and waits for them once per MoE layer (on a GPU the queue drains there), and a layer with a host sync
cannot be captured in a CUDA graph.

Here, with one rank for all experts (the experts permute the tokens themselves, experts/permutation.py "experts"):

* every projection runs as ONE grouped GEMM over all experts, on a stacked weight `[E, out, in]` in group order
  (trainable first). The frozen group's Parameter *is* a view of the stack's tail (no copy); the trainable group's
  values are copied into the stack's head at every forward (the trainable Parameters stay separate: Megatron's DDP
  and optimizer own their storage). Cost: the trainable experts' bf16 weights once more in memory (V2-Lite with ESFT's
  ~10 % of experts: ~2.5 GiB) and one copy of them per forward;
* the group offsets (int32, on the device) are found in the permutation's sorted row keys (expert rank * T + token:
  one `searchsorted` for every group's end row), so neither the counts nor a cumulative sum of them is needed;
* the backward computes the input gradient over all rows (one grouped GEMM, the stack again) and the weight
  gradients of the trainable groups only: a 2D x 2D grouped GEMM whose offsets end with the trainable rows, which
  come first (the frozen rows after them are never read);
* the permutation is part of the same autograd Function (fewer autograd nodes per layer: host time), and nothing
  of size T*k x H is kept for backward: the tokens [T, H] are, and the trainable rows are gathered again in
  backward; the activation is recomputed from fc1's output (kept anyway for the activation's backward).

Results equal the host-count path's (same per-group GEMMs, same gather/sum order): bit for bit on the CPU
(tests/experts/test_device_counts.py). `moe_apply_probs_on_input`, dtypes or shapes without `torch._grouped_mm`,
FP8 experts without a weight cache, and EP > 1 keep the host counts.
"""

from __future__ import annotations

import torch

from megatron_esft.experts.grouped_mm import zero_empty_groups
from megatron_esft.experts.permutation import gather_rows, sum_pairs


class StackedWeights:
    """Per projection, the `[E, out, in]` stack of a grouped experts module in group order (trainable, frozen)."""

    def __init__(self):
        self._stacks: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self._stacks.clear()

    def get(self, trainable: torch.nn.Parameter, frozen: torch.nn.Parameter, proj: str) -> torch.Tensor:
        """The stack with the trainable experts' current values; the frozen Parameter becomes a view of its tail."""
        n_t = trainable.shape[0]
        if n_t == 0:
            return frozen.detach()
        stack = self._stacks.get(proj)
        if stack is None or stack.shape[0] != n_t + frozen.shape[0] or stack.dtype != trainable.dtype \
                or stack.device != trainable.device or (frozen.numel() and frozen.data_ptr() != stack[n_t:].data_ptr()):
            # first use, or the frozen Parameter's data was replaced (a `.to()`, a re-partition): stack again
            stack = torch.empty((n_t + frozen.shape[0], *trainable.shape[1:]), dtype=trainable.dtype,
                                device=trainable.device)
            with torch.no_grad():
                stack[n_t:].copy_(frozen.detach())
            frozen.data = stack[n_t:]  # the same values and Parameter object, now without a copy of its own
            self._stacks[proj] = stack
        with torch.no_grad():
            stack[:n_t].copy_(trainable.detach())
        return stack


class DeviceCountsExpertMLP(torch.autograd.Function):
    """tokens [T, H] -> routed output [T, H] (each token's k expert rows summed) through fc1 -> activation -> fc2 of
    all experts, with the group offsets on the device (module docstring)."""

    @staticmethod
    def forward(ctx, tokens, probs, fc1_trainable, fc2_trainable, fc1_stack, fc2_stack, offs, n_trainable, mapping,
                activation):
        token_of_row, row_of_pair, topk = mapping
        rows = gather_rows(tokens, token_of_row)
        h = torch._grouped_mm(rows, fc1_stack.transpose(-2, -1), offs=offs)
        act = activation(h, probs)
        out = sum_pairs(torch._grouped_mm(act, fc2_stack.transpose(-2, -1), offs=offs), row_of_pair, topk)
        ctx.save_for_backward(tokens, probs, h, offs, token_of_row, row_of_pair)
        # the stacks are kept without autograd's version check: the next micro-batch's forward copies the same
        # trainable values into them again (the optimizer steps only after every micro-batch's backward)
        ctx.stacks, ctx.n_trainable, ctx.topk, ctx.activation = (fc1_stack, fc2_stack), n_trainable, topk, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tokens, probs, h, offs, token_of_row, row_of_pair = ctx.saved_tensors
        fc1_stack, fc2_stack = ctx.stacks
        n_t = ctx.n_trainable
        need_tokens, need_probs, need_fc1, need_fc2 = ctx.needs_input_grad[:4]
        grad_rows = gather_rows(grad_out, token_of_row)  # each row's gradient is its token's (the un-permutation sums)
        grad_act = torch._grouped_mm(grad_rows, fc2_stack, offs=offs)
        with torch.enable_grad():  # the activation again: its input gradients, and fc2's input for its wgrad
            h_in = h.detach().requires_grad_()
            p_in = probs.detach().requires_grad_(need_probs)
            act = ctx.activation(h_in, p_in)
            grads = torch.autograd.grad(act, (h_in, p_in) if need_probs else (h_in,), grad_act)
        grad_h, grad_probs = grads[0], (grads[1] if need_probs else None)
        grad_fc1 = grad_fc2 = grad_tokens = None
        trained = offs[:n_t]  # the trainable groups' rows come first; their offsets end with them
        if need_fc2 and n_t:
            grad_fc2 = zero_empty_groups(torch._grouped_mm(grad_rows.t(), act.detach(), offs=trained), trained)
        if need_fc1 and n_t:
            token_rows = gather_rows(tokens, token_of_row)
            grad_fc1 = zero_empty_groups(torch._grouped_mm(grad_h.t(), token_rows, offs=trained), trained)
        if need_tokens:
            grad_tokens = sum_pairs(torch._grouped_mm(grad_h, fc1_stack, offs=offs), row_of_pair, ctx.topk)
        return grad_tokens, grad_probs, grad_fc1, grad_fc2, None, None, None, None, None, None
