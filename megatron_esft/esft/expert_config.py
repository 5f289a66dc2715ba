"""The official ESFT expert-config format, and how its keys map onto Megatron-Core.

Format (what the official `esft.py::to_esft` and `expert_cfg.json` of the released adapters use):

    {"experts": {"1": [8, 26, 55], "2": [], ...}, "shared_experts": false, "non_expert_modules": false}

* Layer keys are strings of the **0-based HF decoder-layer index** (`model.layers.{k}`); every MoE layer must be
  present (the official loader indexes `cfg["experts"][str(idx)]` for each MoE layer), an empty list is allowed.
* Expert ids are **global** routed-expert ids `0 .. n_routed_experts-1`, listed in selection order.
* `shared_experts` / `non_expert_modules` unfreeze the shared experts / every non-expert parameter (attention,
  norms, router, embeddings, output layer), as in the paper's Table 3.

Megatron-Core mapping:

* layer key `k` <-> the `TransformerLayer` whose `layer_number == k + 1` (1-based, global across pipeline stages;
  the `decoder.layers.{i}` index is stage-local, so never use it as the key).
* global expert `g` lives on expert-parallel rank `g // num_local` at local slot `g % num_local`, with
  `num_local = num_experts // ep_size` (Megatron-Core places experts contiguously per EP rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from megatron_esft.atomic import atomic_write_bytes, read_json  # noqa: F401 (atomic_write_bytes re-exported)
from megatron_esft.errors import UserError

# ----------------------------------------------------------------------------------------------- key mapping


def layer_key_to_layer_number(key: str | int) -> int:
    """ESFT layer key (HF 0-based decoder index) -> Megatron-Core `TransformerLayer.layer_number` (1-based)."""
    return int(key) + 1


def layer_number_to_layer_key(layer_number: int) -> str:
    """Megatron-Core `TransformerLayer.layer_number` (1-based, global) -> ESFT layer key."""
    if layer_number < 1:
        raise ValueError(f"layer_number is 1-based, got {layer_number}")
    return str(layer_number - 1)


def expert_placement(global_id: int, num_experts: int, ep_size: int) -> tuple[int, int]:
    """Global expert id -> (expert-parallel rank, local slot) under Megatron-Core's contiguous placement."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts cannot be split over {ep_size} expert-parallel ranks")
    if not 0 <= global_id < num_experts:
        raise ValueError(f"expert id {global_id} outside 0..{num_experts - 1}")
    num_local = num_experts // ep_size
    return global_id // num_local, global_id % num_local


def global_expert_id(ep_rank: int, local_slot: int, num_local: int) -> int:
    """(expert-parallel rank, local slot) -> global expert id; inverse of `expert_placement`."""
    return ep_rank * num_local + local_slot


# ----------------------------------------------------------------------------------------------- model shape


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What an expert config or a score table must agree with: the model's MoE layers and routed experts."""

    moe_layer_keys: tuple[str, ...]  # HF decoder indices of the MoE layers, ascending
    num_experts: int  # routed experts per MoE layer
    topk: int | None = None  # routed experts per token
    params_per_expert: int | None = None  # parameters of one routed expert (gate+up+down projections)
    score_function: str | None = None  # "softmax" (DeepSeek-MoE/V2) or "sigmoid" (V3)
    source: str = "model"
    # fields that identify the model beyond its MoE shape (same keys as models.hf_config.DeepSeekConfig.summary())
    identity: dict | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_hf_config(cls, path: str | os.PathLike) -> "ModelShape":
        """Read a HF DeepSeek config.json: a file, a HF model directory, or a converted checkpoint (its hf_assets)."""
        path = Path(path)
        file = path
        if path.is_dir():
            file = next((c for c in (path / "config.json", path / "hf_assets" / "config.json") if c.is_file()),
                        path / "config.json")
        if not file.is_file():
            raise UserError(f"{path}: no config.json found (expected a HF model or a converted checkpoint)")
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{file}: not a readable JSON config ({exc})") from None
        return cls.from_hf_dict(cfg, source=str(file))

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config") -> "ModelShape":
        def field(name, default=None):
            value = cfg.get(name, default)
            if value is None and default is None:
                raise UserError(f"{source}: field {name!r} missing (not a DeepSeek MoE config?)")
            return value

        num_layers = int(field("num_hidden_layers"))
        num_experts = int(field("n_routed_experts"))
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        keys = tuple(str(i) for i in range(num_layers) if i >= first_dense and i % freq == 0)
        hidden, moe_ffn = cfg.get("hidden_size"), cfg.get("moe_intermediate_size")
        per_expert = 3 * int(hidden) * int(moe_ffn) if hidden and moe_ffn else None  # SwiGLU: gate, up, down
        topk = cfg.get("num_experts_per_tok")
        arch = {"deepseek_v2": "deepseek-v2", "deepseek_v3": "deepseek-v3", "deepseek": "deepseek-moe"}.get(
            cfg.get("model_type"))
        identity = {"arch": arch, "num_layers": num_layers, "hidden_size": hidden, "vocab_size": cfg.get("vocab_size"),
                    "n_routed_experts": num_experts, "num_experts_per_tok": int(topk) if topk else None}
        return cls(
            moe_layer_keys=keys,
            num_experts=num_experts,
            topk=int(topk) if topk else None,
            params_per_expert=per_expert,
            score_function=cfg.get("scoring_func", "softmax"),
            source=source,
            identity={k: v for k, v in identity.items() if v is not None},
        )

    def describe(self) -> str:
        keys = self.moe_layer_keys
        span = f"{keys[0]}..{keys[-1]}" if len(keys) > 1 else (keys[0] if keys else "none")
        return f"{len(keys)} MoE layers ({span}) x {self.num_experts} experts"


# ----------------------------------------------------------------------------------------------- the config


@dataclasses.dataclass
class ExpertConfig:
    experts: dict[str, list[int]]
    shared_experts: bool = False
    non_expert_modules: bool = False

    def to_json_dict(self) -> dict:
        # Layer keys in string order and top-level keys in this order: byte-identical to the official files.
        return {
            "experts": {k: [int(e) for e in self.experts[k]] for k in sorted(self.experts)},
            "shared_experts": bool(self.shared_experts),
            "non_expert_modules": bool(self.non_expert_modules),
        }

    def num_selected(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def selected(self, layer_key: str | int) -> list[int]:
        """Selected global expert ids of one layer (an empty list for layers absent from the config)."""
        return list(self.experts.get(str(layer_key), []))

    def selected_for_layer_number(self, layer_number: int) -> list[int]:
        return self.selected(layer_number_to_layer_key(layer_number))

    def local_selected(self, layer_number: int, ep_rank: int, num_local: int) -> list[int]:
        """Local expert slots selected on expert-parallel rank `ep_rank` in the layer with this `layer_number`."""
        lo, hi = ep_rank * num_local, (ep_rank + 1) * num_local
        return sorted(g - lo for g in self.selected_for_layer_number(layer_number) if lo <= g < hi)

    def validate(self, shape: ModelShape, source: str = "expert config") -> None:
        """Check the config against a model: exactly its MoE layers, expert ids in range, no duplicates."""
        have, want = set(self.experts), set(shape.moe_layer_keys)
        if have != want:
            missing = sorted(want - have, key=int)
            extra = sorted(have - want, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            parts = []
            if missing:
                parts.append(f"missing MoE layer(s) {', '.join(missing)}")
            if extra:
                parts.append(f"layer(s) {', '.join(extra)} are not MoE layers of the model")
            raise UserError(f"{source}: {'; '.join(parts)} (model {shape.source}: {shape.describe()})")
        for key, ids in self.experts.items():
            bad = [e for e in ids if not 0 <= e < shape.num_experts]
            if bad:
                raise UserError(
                    f"{source}: layer {key}: expert id(s) {bad} outside 0..{shape.num_experts - 1} "
                    f"(model {shape.source}: {shape.describe()})"
                )


def expert_config_from_json_dict(data: object, source: str) -> ExpertConfig:
    """Structural validation of a parsed expert-config JSON object."""
    if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
        raise UserError(f"{source}: expected an object with an \"experts\" object")
    unknown = set(data) - {"experts", "shared_experts", "non_expert_modules"}
    if unknown:
        raise UserError(f"{source}: unknown field(s) {sorted(unknown)}")
    flags = {}
    for name in ("shared_experts", "non_expert_modules"):
        value = data.get(name, False)
        if not isinstance(value, bool):
            raise UserError(f"{source}: field {name!r} must be true or false, got {value!r}")
        flags[name] = value
    experts: dict[str, list[int]] = {}
    for key, ids in data["experts"].items():
        if not (isinstance(key, str) and key.isdigit() and str(int(key)) == key):
            raise UserError(f"{source}: layer key {key!r} is not a decoder-layer index like \"1\"")
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise UserError(f"{source}: layer {key}: expected a list of integer expert ids")
        if any(e < 0 for e in ids):
            raise UserError(f"{source}: layer {key}: negative expert id in {ids}")
        if len(set(ids)) != len(ids):
            raise UserError(f"{source}: layer {key}: duplicate expert ids in {ids}")
        experts[key] = list(ids)
    return ExpertConfig(experts=experts, **flags)


def load_expert_config(path: str | os.PathLike, shape: ModelShape | None = None) -> ExpertConfig:
    """Load (and, given a model shape, validate) an expert config written by us or by the official scripts."""
    path = Path(path)
    cfg = expert_config_from_json_dict(read_json(path), str(path))
    if shape is not None:
        cfg.validate(shape, source=str(path))
    return cfg


def save_expert_config(cfg: ExpertConfig, path: str | os.PathLike, shape: ModelShape | None = None) -> None:
    """Validate (against `shape` when given) and write atomically in the official byte layout."""
    if shape is not None:
        cfg.validate(shape, source=str(path))
    atomic_write_bytes(path, json.dumps(cfg.to_json_dict()).encode())
