"""Megatron-Core sharded-checkpoint keys <-> Hugging Face DeepSeek tensor names.

The unit of conversion is a *piece*: one ShardedTensor of Megatron-Core's sharded state dict after its factories are
applied (the SwiGLU factory splits `linear_fc1` into its gate and up halves). Every piece is a rectangular block of
exactly one HF tensor, except the fused `linear_qkv` of standard attention (DeepSeekMoE 16B), whose rows interleave
q, k and v per query group. Working per piece makes the mapping independent of TP/EP/PP: the piece's global offset
says which HF tensor rows it holds.

Key layout (global layer index L, global expert id E; experts are stacked along a prepended axis):

| Megatron-Core key                                   | HF name                                             |
|-----------------------------------------------------|-----------------------------------------------------|
| embedding.word_embeddings.weight                    | model.embed_tokens.weight                           |
| output_layer.weight                                 | lm_head.weight                                      |
| decoder.final_layernorm.weight                      | model.norm.weight                                   |
| decoder.layers.L.input_layernorm.weight             | model.layers.L.input_layernorm.weight               |
| decoder.layers.L.pre_mlp_layernorm.weight           | model.layers.L.post_attention_layernorm.weight      |
| ....self_attention.linear_proj.weight               | ....self_attn.o_proj.weight                         |
| ....self_attention.linear_q_proj.weight             | ....self_attn.q_proj.weight          (MLA, no q-LoRA) |
| ....self_attention.linear_q_down_proj / q_layernorm / linear_q_up_proj | q_a_proj / q_a_layernorm / q_b_proj |
| ....self_attention.linear_kv_down_proj / kv_layernorm / linear_kv_up_proj | kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj |
| ....self_attention.linear_qkv.weight                | ....self_attn.{q,k,v}_proj.weight (interleaved per group) |
| ....mlp.linear_fc1.weight  rows [0,F) / [F,2F)      | ....mlp.gate_proj.weight / up_proj.weight (dense)   |
| ....mlp.linear_fc2.weight                           | ....mlp.down_proj.weight                            |
| ....mlp.router.weight / router.expert_bias          | ....mlp.gate.weight / gate.e_score_correction_bias  |
| ....mlp.shared_experts.linear_fc1/2.weight          | ....mlp.shared_experts.{gate,up}/down_proj.weight   |
| ....mlp.experts.experts.linear_fc1.weight [E, 2F, H] | ....mlp.experts.E.{gate,up}_proj.weight            |
| ....mlp.experts.experts.linear_fc2.weight [E, H, F] | ....mlp.experts.E.down_proj.weight                  |
"""

from __future__ import annotations

import dataclasses
import re

import torch

from megatron_esft.errors import UserError
from megatron_esft.models.hf_config import DeepSeekConfig

_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    # Megatron's keys for norms fused into the next linear (TE spec; the local non-MLA spec saves these too)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}
_GATED = {  # fc1 = [gate; up]: HF prefix of the two halves
    "mlp.linear_fc1.weight": "mlp.",
    "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts.",
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"


@dataclasses.dataclass(frozen=True)
class Piece:
    """A block of one HF tensor: rows [row0, row0 + rows) (and the piece's other offsets on the remaining dims)."""

    hf_name: str
    row0: int
    expert: int | None = None  # set for stacked routed-expert pieces


def _qkv_names(layer: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in ("q", "k", "v")]


def resolve(key: str, global_offset: tuple[int, ...], prepend: int, cfg: DeepSeekConfig) -> Piece | None:
    """The HF source of a piece, or None for `linear_qkv` (handled by `qkv_fuse`/`qkv_split`)."""
    if key in _TOP:
        return Piece(_TOP[key], global_offset[0])
    match = _LAYER_KEY.match(key)
    if not match:
        raise UserError(f"checkpoint key '{key}' has no Hugging Face mapping")
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}."
    if rest in (EXPERT_FC1, EXPERT_FC2):
        expert, row = global_offset[0], global_offset[prepend]
        if rest == EXPERT_FC2:
            return Piece(f"{prefix}mlp.experts.{expert}.down_proj.weight", row, expert)
        half, row = divmod(row, cfg.moe_intermediate_size)
        return Piece(f"{prefix}mlp.experts.{expert}.{('gate', 'up')[half]}_proj.weight", row, expert)
    if rest in _GATED:
        shared_width = cfg.moe_intermediate_size * cfg.n_shared_experts
        width = cfg.intermediate_size if rest == "mlp.linear_fc1.weight" else shared_width
        half, row = divmod(global_offset[0], width)
        return Piece(f"{prefix}{_GATED[rest]}{('gate', 'up')[half]}_proj.weight", row)
    if rest in _LAYER:
        return Piece(prefix + _LAYER[rest], global_offset[0] if global_offset else 0)
    if rest == "self_attention.linear_qkv.weight":
        return None
    raise UserError(f"checkpoint key '{key}' has no Hugging Face mapping")


def qkv_layer(key: str) -> int:
    return int(_LAYER_KEY.match(key).group(1))


def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: DeepSeekConfig) -> torch.Tensor:
    """HF q/k/v -> Megatron's fused linear_qkv rows: per query group [its q heads, k head, v head]."""
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[-1]
    q = q.reshape(groups, per_group * d, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_split(qkv: torch.Tensor, cfg: DeepSeekConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = qkv.shape[-1]
    qkv = qkv.reshape(groups, (per_group + 2) * d, hidden)
    q, k, v = torch.split(qkv, [per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def qkv_hf_names(key: str) -> list[str]:
    return _qkv_names(qkv_layer(key))
