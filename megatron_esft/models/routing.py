"""DeepSeek-V2 top-k semantics that Megatron-Core's TopKRouter does not have natively.

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
