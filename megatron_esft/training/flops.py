"""Useful model FLOPs of fine-tuning iterations: `--log-throughput`'s TFLOP/s per GPU, and bench/gpu_esft.py's.

Counted for the whole model from its HF config (every pipeline stage, expert shard and tensor-parallel slice), two
FLOPs per multiply-accumulate:

* forward: every weight matrix once per token (MLA or standard attention projections; the dense MLP, or the shared
  experts and the router; the output layer), the routed experts once per routed row (top-k, dropless: tokens x k
  per MoE layer), and the attention core: scores over the q/k head dims and PV over the v head dims for every
  attended (query, key) pair — causal within each packed document, padding excluded. Embedding lookups: 0.
* input gradients only where a gradient has to flow: the same again in every layer above the lowest layer that
  holds a trainable weight (the attention core twice: flash backward recomputes the scores), the output layer's;
  inside that lowest layer only what reaches its trainable weights (the fc2 input gradient of the trained experts'
  rows, and of the shared experts when they train); nothing below it.
* weight gradients only for trainable weights: with ESFT the selected experts' routed rows (plus the shared experts
  or the non-expert weights when the expert config trains them); with full fine-tuning every weight.

Megatron-LM's --log-throughput counts 3x the forward for every weight; for ESFT that would credit the ~90% frozen
experts and the frozen attention with weight gradients that are never computed.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_esft.models.hf_config import DeepSeekConfig


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Multiply-accumulates per token of one decoder layer's weight matrices, by part."""

    attention: int
    mlp: int  # the dense MLP, or the shared experts
    router: int
    fc2_per_expert: int  # one routed expert's fc2 (its input gradient is what the lowest trained layer computes)


def layer_weights(cfg: DeepSeekConfig, layer: int) -> LayerWeights:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.multi_latent_attention:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = h * heads * qk if not cfg.q_lora_rank else cfg.q_lora_rank * (h + heads * qk)
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim
                                                                                          + cfg.v_head_dim)
        attention = q + kv + heads * cfg.v_head_dim * h
    else:
        head_dim = cfg.head_dim or h // heads
        attention = h * head_dim * (heads + 2 * cfg.num_key_value_heads) + heads * head_dim * h
    if not cfg.is_moe_layer(layer):
        return LayerWeights(attention, 3 * h * cfg.intermediate_size, 0, 0)
    shared = 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
    return LayerWeights(attention, shared, h * cfg.n_routed_experts, h * cfg.moe_intermediate_size)


def attention_core_macs_per_pair(cfg: DeepSeekConfig) -> int:
    """Multiply-accumulates of one attended (query, key) pair over all heads: q.k scores and the PV product."""
    if cfg.multi_latent_attention:
        dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        dims = 2 * (cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads)
    return cfg.num_attention_heads * dims


def attended_pairs(document_ids: torch.Tensor) -> int:
    """(query, key) pairs a causal attention within each document computes: sum of n(n+1)/2 over the documents
    (runs of one id >= 0 along the last dim of `document_ids`; -1 = padding, not counted)."""
    total = 0
    for row in document_ids.reshape(-1, document_ids.shape[-1]):
        ids, lengths = torch.unique_consecutive(row, return_counts=True)
        lengths = lengths[ids >= 0].to(torch.int64)
        total += int((lengths * (lengths + 1) // 2).sum())
    return total


@dataclasses.dataclass(frozen=True)
class TrainedWeights:
    """What trains: `experts` HF layer -> selected routed expert ids (None: full fine-tuning, everything)."""

    experts: dict[int, list[int]] | None = None
    shared_experts: bool = False
    non_expert_modules: bool = False

    @property
    def full(self) -> bool:
        return self.experts is None

    @classmethod
    def from_expert_config(cls, ecfg) -> "TrainedWeights":
        """From an esft.expert_config.ExpertConfig (None: full fine-tuning)."""
        if ecfg is None:
            return cls()
        return cls({int(k): list(v) for k, v in ecfg.experts.items()}, bool(ecfg.shared_experts),
                   bool(ecfg.non_expert_modules))


def iteration_flops(cfg: DeepSeekConfig, trained: TrainedWeights, *, tokens: float, pairs: float,
                    trained_rows: dict[int, float] | None = None) -> float:
    """Useful FLOPs (module docstring) of `tokens` tokens with `pairs` attended pairs in all. `trained_rows`: HF MoE
    layer -> routed rows that reached its selected experts (ESFT); a layer without an entry gets its selected share
    of the tokens x k routed rows."""
    k, core = cfg.num_experts_per_tok, 2 * attention_core_macs_per_pair(cfg) * pairs
    trained_rows = trained_rows or {}
    lowest = _lowest_trained_layer(cfg, trained)
    fwd = dgrad = wgrad = 0.0
    for layer in range(cfg.num_layers):
        w = layer_weights(cfg, layer)
        routed = tokens * k if cfg.is_moe_layer(layer) else 0.0
        expert = 3 * w.fc2_per_expert  # fc1 (gate and up) + fc2
        dense = w.attention + w.mlp + w.router
        f_layer = 2 * dense * tokens + core + 2 * expert * routed
        fwd += f_layer
        if trained.full:
            dgrad += f_layer + core
            wgrad += 2 * dense * tokens + 2 * expert * routed
            continue
        moe = cfg.is_moe_layer(layer)
        selected = trained.experts.get(layer, []) if moe else []
        rows = trained_rows.get(layer, routed * len(selected) / cfg.n_routed_experts) if selected else 0.0
        shared = trained.shared_experts and moe
        if lowest is not None and layer > lowest:
            dgrad += f_layer + core
        elif layer == lowest:  # only the fc2 inputs of what trains there (fc1's weight gradient needs no more)
            dgrad += 2 * w.fc2_per_expert * rows + (2 * (w.mlp // 3) * tokens if shared else 0)
        trained_dense = (w.mlp if shared else 0) + (
            w.attention + w.router + (0 if moe else w.mlp) if trained.non_expert_modules else 0)
        wgrad += 2 * expert * rows + 2 * tokens * trained_dense
    out = 2 * cfg.vocab_size * cfg.hidden_size * tokens
    output_trains = trained.full or trained.non_expert_modules
    return fwd + dgrad + wgrad + 2 * out + (out if output_trains else 0.0)


def _lowest_trained_layer(cfg: DeepSeekConfig, trained: TrainedWeights) -> int | None:
    """The lowest decoder layer holding a trainable weight; -1 when the embedding trains (every layer's input
    gradient is needed); None when no layer trains."""
    if trained.full or trained.non_expert_modules:
        return -1
    layers = [layer for layer in cfg.moe_layers if trained.experts.get(layer) or trained.shared_experts]
    return min(layers) if layers else None


def tflops_per_gpu(cfg: DeepSeekConfig, trained: TrainedWeights, *, tokens: float, pairs: float,
                   expert_load: torch.Tensor | None, seconds: float, world_size: int) -> float:
    """Model TFLOP/s per GPU of a logging window (Megatron-LM's `throughput per GPU (TFLOP/s/GPU)`, useful FLOPs):
    `tokens` and `pairs` summed over the window's iterations, `expert_load` the window's global routed-token counts
    per [HF layer, expert] (training/expert_load.py; padding excluded), whose selected share of each MoE layer
    gives that layer's trained rows."""
    rows = None
    if expert_load is not None and not trained.full:
        rows = {}
        for layer, selected in trained.experts.items():
            total = float(expert_load[layer].sum()) if layer < expert_load.shape[0] else 0.0
            if selected and total > 0:
                share = float(expert_load[layer][selected].sum()) / total
                rows[layer] = share * tokens * cfg.num_experts_per_tok
    flops = iteration_flops(cfg, trained, tokens=tokens, pairs=pairs, trained_rows=rows)
    return flops / max(seconds, 1e-12) / world_size / 1e12
