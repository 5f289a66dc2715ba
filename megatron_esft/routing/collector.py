"""Routing statistics on a Megatron-Core model: hooks on every MoE router, reduced over all parallel ranks.

`RoutingStatsCollector(model)` finds every `TopKRouter` (`decoder.layers[i].mlp.router`) in the model chunks of this
rank and, while attached, accumulates per MoE layer and routed expert, in float64 / int64 on the router's device:

* `counts[l, i]`: tokens whose top-k contains expert i (from the router's `routing_map`);
* `gate_sums[l, i]`: the summed gate value of expert i over those tokens;
* `num_tokens[l]`: tokens routed in layer l.

Padding is excluded: a token counts only if it is valid in the mask given by `set_valid_mask` ([batch, seq], True =
real token) for the current micro-batch and not marked in the router's own `padding_mask` argument (True = padding,
what `GPTModel(..., padding_mask=...)` passes down). Layer keys are HF decoder indices: `router.layer_number - 1`.

What "gate" means (`gate=`), computed from the router's fp32 logits, independent of how the model scales its
routing weights afterwards:

* ``"raw"`` (default, the paper's g_{i,t} = s_{i,t}): the score function's value for each selected expert, 0 for the
  others. Score function softmax (DeepSeekMoE, DeepSeek-V2 / V2-Lite, ESFT-vanilla-lite): the softmax probability over
  **all** routed experts, un-renormalised, before `routed_scaling_factor` -- exactly what the official ESFT logs hold.
  Score function sigmoid (DeepSeek-V3 / R1): the sigmoid affinity (without the `e_score_correction_bias`, which only
  influences which experts are chosen). A layer's gate scores then sum to < 1 (softmax) or to about K x the mean
  affinity (sigmoid), so gate thresholds are not comparable across architectures.
* ``"normalized"``: the selected raw values divided by their per-token sum, i.e. the routing weights of models with
  `norm_topk_prob` (V3) before `routed_scaling_factor`. Each token's gates sum to 1, so a layer's gate scores sum to 1
  and a gate threshold p means the same fraction on every architecture.

Parallelism (`reduce()` is a collective over the whole world; every rank gets the result):

* data-parallel and expert-parallel ranks route different tokens (routers are replicated, each sees its own tokens
  before dispatch): summed;
* tensor parallel with sequence parallelism: each TP rank routes a shard of the sequence ([s/tp, b, h]); the valid
  mask is sliced to this rank's shard (tokens are sequence-major, [s, b] flattened): summed;
* tensor parallel without sequence parallelism: every TP rank routes the same tokens; only TP rank 0 counts;
* pipeline stages own different layers: each rank fills only its layers, the sum gathers them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_esft.parallel import all_reduce, local_device

from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import layer_number_to_layer_key
from megatron_esft.routing.scores import GATE_KINDS, ExpertScores


def find_routers(model_chunks) -> list:
    """All TopKRouter modules of this rank's model chunks, in module order."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class RoutingStatsCollector:
    def __init__(self, model_chunks, gate: str = "raw"):
        if gate not in GATE_KINDS:
            raise UserError(f"--gate: unknown gate kind {gate!r} (choose from {', '.join(GATE_KINDS)})")
        self.gate = gate
        self.routers = find_routers(model_chunks)
        if not self.routers:
            # A pipeline stage may hold only dense layers; it still takes part in the reduction.
            chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
            self.config = chunks[0].config
        else:
            self.config = self.routers[0].config
        if not self.config.num_moe_experts:
            raise UserError("the model has no MoE layers (num_moe_experts is not set)")
        if getattr(self.config, "context_parallel_size", 1) > 1:
            raise UserError("routing statistics do not support context parallelism")
        self.num_experts = self.config.num_moe_experts
        self.topk = self.config.moe_router_topk
        self.num_layers = self.config.num_layers  # global decoder layers: accumulators are indexed by layer_number-1
        self.score_function = self.config.moe_router_score_function
        device = self.routers[0].weight.device if self.routers else local_device()
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=device)
        self.gate_sums = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self.num_tokens = torch.zeros(self.num_layers, dtype=torch.int64, device=device)
        self.owned = torch.zeros(self.num_layers, dtype=torch.int64, device=device)
        for router in self.routers:
            if router.layer_number is None:
                raise RuntimeError("a TopKRouter has no layer_number (not built inside a TransformerLayer?)")
            self.owned[router.layer_number - 1] = 1
        self._handles = []
        self._valid_bs = None  # [b, s] bool for the current micro-batch
        self._valid_cache = {}
        self._logits = {}
        self._counting = True
        self._tp_rank, self._tp_size = _tp_rank_size()
        self._sp = bool(self.config.sequence_parallel)
        if self._tp_size > 1 and not self._sp and self._tp_rank != 0:
            self._counting = False  # the same tokens are routed on every TP rank: count them once

    # ------------------------------------------------------------------------------------------- hooks

    def attach(self) -> "RoutingStatsCollector":
        if self._handles:
            return self
        for router in self.routers:
            self._wrap_gating(router)
            self._handles.append(router.register_forward_hook(self._on_router_output, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for router in self.routers:
            if "gating" in router.__dict__:
                del router.gating  # back to the class method
        self._logits.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    def _wrap_gating(self, router) -> None:
        # TopKRouter.forward computes logits = self.gating(input) and never returns them; the gate values we want
        # (softmax / sigmoid of the logits) are not recoverable from `probs` once top-k renormalisation or scaling
        # was applied, so keep the logits of the current call.
        original = router.gating
        store = self._logits
        key = id(router)

        def gating(input, _original=original):
            logits = _original(input)
            store[key] = logits
            return logits

        router.gating = gating

    def set_valid_mask(self, valid) -> None:
        """Mask of real tokens of the next micro-batch, [batch, seq] bool (True = count it); None = all tokens."""
        self._valid_bs = None if valid is None else valid.to(dtype=torch.bool)
        self._valid_cache = {}

    def _token_mask(self, seq_local: int, batch: int, device):
        if self._valid_bs is None:
            return None
        cached = self._valid_cache.get(seq_local)
        if cached is not None:
            return cached
        b, s = self._valid_bs.shape
        if b != batch:
            raise RuntimeError(f"valid mask is for batch {b}, the router saw batch {batch}")
        mask_sb = self._valid_bs.t()
        if seq_local == s:
            pass
        elif self._sp and seq_local * self._tp_size == s:
            mask_sb = mask_sb[self._tp_rank * seq_local:(self._tp_rank + 1) * seq_local]
        else:
            raise RuntimeError(f"valid mask has {s} positions, the router saw {seq_local} per sequence")
        flat = mask_sb.reshape(-1).to(device)
        self._valid_cache[seq_local] = flat
        return flat

    @torch.no_grad()
    def _on_router_output(self, router, args, kwargs, output):
        logits = self._logits.pop(id(router), None)
        if not self._counting:
            return
        probs, routing_map = output
        tokens = routing_map.shape[0]
        hidden = args[0] if args else kwargs["input"]
        padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        valid = self._token_mask(hidden.shape[0], hidden.shape[1], routing_map.device)
        if padding is not None:
            not_pad = ~padding.reshape(-1).to(device=routing_map.device, dtype=torch.bool)
            valid = not_pad if valid is None else valid & not_pad
        if logits is None:
            raise RuntimeError("router logits were not captured (was the collector attached after a wrapper?)")
        logits = logits.reshape(tokens, self.num_experts)
        if logits.dtype != torch.float64:
            logits = logits.float()  # like the router itself (moe_router_dtype fp32) and HF's gate
        scores = torch.softmax(logits, dim=-1) if self.score_function == "softmax" else torch.sigmoid(logits)
        selected = routing_map if valid is None else routing_map & valid[:, None]
        gates = torch.where(selected, scores, 0.0)
        if self.gate == "normalized":
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        row = router.layer_number - 1
        self.counts[row] += selected.sum(dim=0)
        self.gate_sums[row] += gates.sum(dim=0, dtype=torch.float64)
        self.num_tokens[row] += tokens if valid is None else valid.sum()

    # ------------------------------------------------------------------------------------------- results

    def reset(self) -> None:
        self.counts.zero_()
        self.gate_sums.zero_()
        self.num_tokens.zero_()

    def local_tokens(self) -> int:
        """Tokens counted on this rank so far, in its first MoE layer (0 on ranks that do not count)."""
        owned = self.owned.nonzero()
        return int(self.num_tokens[owned[0, 0]]) if len(owned) else 0

    def reduce(self, model: dict | None = None, data: dict | None = None) -> ExpertScores:
        """Sum the statistics over all ranks (a collective: call it on every rank) and return the scores."""
        counts, gate_sums = self.counts.clone(), self.gate_sums.clone()
        num_tokens, owned = self.num_tokens.clone(), self.owned.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in (counts, gate_sums, num_tokens, owned):
                all_reduce(tensor)
        rows = [i for i in range(self.num_layers) if owned[i] > 0]
        return ExpertScores.from_counts(
            [layer_number_to_layer_key(i + 1) for i in rows],
            counts[rows].cpu().numpy(),
            gate_sums[rows].cpu().numpy(),
            num_tokens[rows].cpu().numpy(),
            self.topk,
            gate=f"{self.gate} {self.score_function}",
            model=model,
            data=data,
        )


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size())
