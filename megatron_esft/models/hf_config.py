"""Read a Hugging Face DeepSeek `config.json` into one normalized, validated description.

Three architectures are supported:

* ``deepseek-v2`` (`model_type` "deepseek_v2": DeepSeek-V2, V2-Lite, ESFT-vanilla-lite): MLA, softmax gate, greedy or
  group-limited-greedy top-k (group score = max expert score in the group), optional YaRN.
* ``deepseek-v3`` (`model_type` "deepseek_v3": V3, R1): MLA, sigmoid gate with `e_score_correction_bias`, group-limited
  top-k (group score = sum of the top-2 scores), normalized top-k, routed scaling. Multi-token-prediction layers are
  not imported (logged).
* ``deepseek-moe`` (`model_type` "deepseek": DeepSeekMoE 16B, remote code): standard multi-head attention, softmax gate.

Both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings of RoPE are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from megatron_esft.atomic import read_json
from megatron_esft.errors import UserError

ARCH_BY_MODEL_TYPE = {"deepseek_v2": "deepseek-v2", "deepseek_v3": "deepseek-v3", "deepseek": "deepseek-moe"}
MODEL_TYPE_BY_ARCH = {v: k for k, v in ARCH_BY_MODEL_TYPE.items()}


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense (first_k_dense_replace) layers
    moe_intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    score_function: str  # "softmax" | "sigmoid"
    topk_method: str  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # YaRN parameters or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # MLA (deepseek-v2 / v3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # standard attention (deepseek-moe)
    head_dim: int | None = None
    aux_loss_alpha: float = 0.0
    seq_aux: bool = False
    num_nextn_predict_layers: int = 0
    torch_dtype: str = "bfloat16"
    source: str = ""

    @property
    def multi_latent_attention(self) -> bool:
        return self.arch in ("deepseek-v2", "deepseek-v3")

    def is_moe_layer(self, layer: int) -> bool:
        """HF decoder-layer index -> True when the layer has routed experts."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.is_moe_layer(layer)]

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def summary(self) -> dict:
        """The fields that identify a model for compatibility checks (scores, expert configs, checkpoints)."""
        return {
            "arch": self.arch,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_layers": self.moe_layers,
        }


def _field(raw: dict, name: str, source: str, default: Any = dataclasses.MISSING, kind=None):
    if name not in raw or raw[name] is None:
        if default is dataclasses.MISSING:
            raise UserError(f"{source}: field '{name}' is missing")
        return default
    value = raw[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "yarn":
        raise UserError(f"{source}: rope type '{rope_type}' is not supported (only default and yarn)")
    spec = scaling or params
    for key in ("factor", "original_max_position_embeddings"):
        if key not in spec:
            raise UserError(f"{source}: yarn rope scaling needs field '{key}'")
    return theta, {
        "factor": float(spec["factor"]),
        "original_max_position_embeddings": int(spec["original_max_position_embeddings"]),
        "beta_fast": float(spec.get("beta_fast", 32)),
        "beta_slow": float(spec.get("beta_slow", 1)),
        "mscale": float(spec.get("mscale", 1.0)),
        "mscale_all_dim": float(spec.get("mscale_all_dim", 0.0)),
    }


def parse_hf_config(raw: dict, source: str = "config.json") -> DeepSeekConfig:
    model_type = raw.get("model_type")
    if model_type not in ARCH_BY_MODEL_TYPE:
        supported = ", ".join(sorted(ARCH_BY_MODEL_TYPE))
        raise UserError(f"{source}: unsupported architecture model_type={model_type!r} (supported: {supported})")
    arch = ARCH_BY_MODEL_TYPE[model_type]
    f = lambda name, default=dataclasses.MISSING, kind=None: _field(raw, name, source, default, kind)  # noqa: E731
    heads = f("num_attention_heads", kind=int)
    hidden = f("hidden_size", kind=int)
    theta, yarn = _rope(raw, source)
    common = dict(
        arch=arch,
        vocab_size=f("vocab_size", kind=int),
        hidden_size=hidden,
        intermediate_size=f("intermediate_size", kind=int),
        moe_intermediate_size=f("moe_intermediate_size", kind=int),
        num_layers=f("num_hidden_layers", kind=int),
        num_attention_heads=heads,
        num_key_value_heads=f("num_key_value_heads", heads, kind=int),
        first_k_dense_replace=f("first_k_dense_replace", 0),
        moe_layer_freq=f("moe_layer_freq", 1, kind=int),
        n_routed_experts=f("n_routed_experts", kind=int),
        n_shared_experts=f("n_shared_experts", 0),
        num_experts_per_tok=f("num_experts_per_tok", kind=int),
        routed_scaling_factor=float(f("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(f("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=yarn,
        max_position_embeddings=f("max_position_embeddings", 4096, kind=int),
        tie_word_embeddings=bool(f("tie_word_embeddings", False)),
        aux_loss_alpha=float(f("aux_loss_alpha", 0.0)),
        seq_aux=bool(f("seq_aux", False)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        source=source,
    )
    if arch == "deepseek-v3":
        common.update(
            score_function="sigmoid",
            topk_method="noaux_tc",
            n_group=f("n_group", 1, kind=int),
            topk_group=f("topk_group", 1, kind=int),
            norm_topk_prob=bool(f("norm_topk_prob", True)),
            num_nextn_predict_layers=int(f("num_nextn_predict_layers", 0)),
        )
        if not common["norm_topk_prob"]:
            raise UserError(f"{source}: deepseek_v3 with norm_topk_prob=false is not supported")
    else:
        scoring = f("scoring_func", "softmax")
        if scoring != "softmax":
            raise UserError(f"{source}: field 'scoring_func' must be 'softmax' for {model_type}, got {scoring!r}")
        method = f("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise UserError(f"{source}: field 'topk_method' {method!r} is not supported (greedy, group_limited_greedy)")
        common.update(
            score_function="softmax",
            topk_method=method,
            n_group=f("n_group", 1, kind=int) if method == "group_limited_greedy" else 1,
            topk_group=f("topk_group", 1, kind=int) if method == "group_limited_greedy" else 1,
            norm_topk_prob=bool(f("norm_topk_prob", False)),
        )
    if common["n_routed_experts"] % common["n_group"]:
        raise UserError(
            f"{source}: n_routed_experts {common['n_routed_experts']} not divisible by n_group {common['n_group']}"
        )
    if common["num_experts_per_tok"] > common["n_routed_experts"]:
        raise UserError(f"{source}: num_experts_per_tok exceeds n_routed_experts")
    if arch == "deepseek-moe":
        if raw.get("attention_bias"):
            raise UserError(f"{source}: attention_bias=true is not supported")
        if hidden % heads:
            raise UserError(f"{source}: hidden_size {hidden} not divisible by num_attention_heads {heads}")
        common["head_dim"] = hidden // heads
    else:
        q_lora = raw.get("q_lora_rank")
        common.update(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=f("kv_lora_rank", kind=int),
            qk_nope_head_dim=f("qk_nope_head_dim", kind=int),
            qk_rope_head_dim=f("qk_rope_head_dim", kind=int),
            v_head_dim=f("v_head_dim", kind=int),
        )
    if common["first_k_dense_replace"] >= common["num_layers"]:
        raise UserError(f"{source}: first_k_dense_replace leaves no MoE layer")
    return DeepSeekConfig(**common)


def load_hf_config(path: str) -> DeepSeekConfig:
    """`path` is a HF model directory or a config.json file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        where = f"directory {path}" if os.path.isdir(path) else path
        raise UserError(f"{where}: no config.json found")
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object")
    return parse_hf_config(raw, source=file)


def load_raw_config(path: str) -> dict:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)
