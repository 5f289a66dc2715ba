"""DeepSeek-V2 top-k semantics that Megatron-Core's TopKRouter does not have natively, and a router gating GEMM
that saves nothing for a frozen router's weight gradient (`use_frozen_aware_gating`).

Megatron-Core 0.16.1 `group_limited_topk` scores a group by the *sum of its top-(k/groups) experts*, which is
DeepSeek-V3's rule. DeepSeek-V2 (`topk_method: group_limited_greedy`) scores a group by its *max* expert score, and,
with `norm_topk_prob`, renormalizes the selected softmax probabilities instead of scaling them. TopKRouter exposes
one seam for replacing the top-k step, `router.router_replay.get_replay_topk(scores, topk, num_groups, group_topk,
default_compute_topk)` (moe_utils.py:699-707), so the V2 rule plugs in there without copying the router.
"""

from __future__ import annotations

import torch


class DeepSeekV2TopK:
    """Drop-in for `TopKRouter.router_replay` implementing V2's greedy / group-limited-greedy top-k."""

    def __init__(self, num_groups: int, group_topk: int, renormalize: bool):
        self.num_groups = num_groups
        self.group_topk = group_topk
        self.renormalize = renormalize

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.num_groups > 1:
            tokens, experts = scores.shape
            group_scores = scores.view(tokens, self.num_groups, experts // self.num_groups).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.group_topk, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts // self.num_groups).reshape(tokens, experts)
            scores = scores.masked_fill(~expert_mask, 0.0)
        values, indices = torch.topk(scores, k=topk, dim=-1)
        if self.renormalize and topk > 1:
            values = values / (values.sum(dim=-1, keepdim=True) + 1e-20)
        return values, indices

    # TopKRouter only calls get_replay_topk; these keep RouterReplay's other entry points harmless.
    def record_indices(self, *args, **kwargs):
        pass

    def clear_indices(self, *args, **kwargs):
        pass


def _frozen_router_logits(router, input: torch.Tensor) -> torch.Tensor:
    """Megatron's gating GEMM (mm / addmm in the router dtype, as RouterGatingLinearFunction runs it without
    Transformer Engine) as plain torch ops: with a frozen weight autograd saves only the weight (input gradient)."""
    dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(router.config.moe_router_dtype, input.dtype)
    rows = input.reshape(-1, input.shape[-1]).to(dtype)
    weight_t = _weight_in(router, dtype).t()
    logits = torch.mm(rows, weight_t) if router.bias is None else torch.addmm(router.bias.to(dtype), rows, weight_t)
    return logits.view(*input.shape[:-1], -1)


def _weight_in(router, dtype: torch.dtype) -> torch.Tensor:
    """The frozen gating weight in `dtype`, converted once (not in every forward: a kernel per MoE layer on a GPU) and
    again only when the weight's storage or autograd version changes (a checkpoint load copies into it)."""
    weight = router.weight
    if weight.dtype == dtype:
        return weight
    key = (weight.data_ptr(), weight._version, weight.device, dtype)
    cached = getattr(router, "_esft_gating_weight", None)
    if cached is None or cached[0] != key:
        cached = router._esft_gating_weight = (key, weight.detach().to(dtype))
    return cached[1]


def _frozen_aware_class(router_class: type) -> type:
    """A subclass of `router_class` whose `gating` runs `_frozen_router_logits` while the router is frozen (ESFT).
    Megatron's RouterGatingLinearFunction saves its input [s, b, h] for a weight gradient that is then never
    computed, holding it until backward (16 MiB per V2-Lite MoE layer at seq 4096, bf16); same logits and input
    gradient bit for bit. (A plain subclass: routers switch to it in place, through `__class__`.)"""

    def gating(self, input):
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not frozen or self.weight.device != input.device:
            return router_class.gating(self, input)  # trains, or Megatron moves host weights to the GPU first
        return _frozen_router_logits(self, input)

    return type(f"FrozenAware{router_class.__name__}", (router_class,), {"gating": gating, "_esft_frozen_aware": True})


_FROZEN_AWARE_CLASSES: dict[type, type] = {}


def use_frozen_aware_gating(model) -> int:
    """Give every TopKRouter of `model` the frozen-aware gating (a subclass of its own class); returns how many."""
    from megatron.core.transformer.moe.router import TopKRouter

    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, TopKRouter) and not getattr(cls, "_esft_frozen_aware", False):
            if cls not in _FROZEN_AWARE_CLASSES:
                _FROZEN_AWARE_CLASSES[cls] = _frozen_aware_class(cls)
            module.__class__ = _FROZEN_AWARE_CLASSES[cls]
            count += 1
    return count
