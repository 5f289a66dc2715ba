"""The official ESFT adapter: `expert_cfg.json` + one safetensors file of the trained tensors only, HF names.

What the official `esft.py::load_esft_model` / `add_adapter` load strictly onto the base model after `to_esft`:
exactly the parameters `to_esft` leaves trainable, i.e.

* routed experts `model.layers.{k}.mlp.experts.{g}.{gate,up,down}_proj.weight` for every selected (k, g);
* `model.layers.{k}.mlp.shared_experts.*` of every MoE layer when `shared_experts` is true;
* every other parameter (attention, norms, router `mlp.gate.weight`, embeddings, `lm_head`) when
  `non_expert_modules` is true (routed experts that are not selected stay out in every case).

`export_adapter(load_dir, out_dir)` reads only those pieces from a training checkpoint (any saved TP/EP/PP layout)
and writes them atomically; `merge_adapter(base_hf, adapter_dir, out_dir)` overwrites them in a base HF checkpoint,
which is what serving an adapter means (the result equals `convert_mcore_to_hf.py` of the same checkpoint).
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_esft import parallel as par
from megatron_esft.checkpoint import convert
from megatron_esft.checkpoint.fp8_blocks import SCALE_SUFFIX, SourceForm
from megatron_esft.checkpoint.mcore_checkpoint import HF_ASSETS, copy_hf_assets, read_meta, read_tracker
from megatron_esft.checkpoint.trained_only import base_of, load_pieces
from megatron_esft.atomic import HF_DIRECTORY_SUFFIXES, atomic_directory, check_replaceable
from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import ExpertConfig, expert_config_from_json_dict

ADAPTER_CONFIG = "expert_cfg.json"
ADAPTER_WEIGHTS = "model.safetensors"
ADAPTER_SUFFIXES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # an earlier adapter export, nothing else (check_replaceable)
ROUTED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")  # HF name: (layer, expert)
_SHARED = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_experts\.")
_BUFFERS = ("e_score_correction_bias",)  # HF buffers, not parameters: never part of an adapter


def in_adapter(hf_name: str, ecfg: ExpertConfig) -> bool:
    """Is this HF tensor trainable under the official `to_esft(model, ecfg)`?"""
    if hf_name.endswith(_BUFFERS):
        return False
    routed = ROUTED_EXPERT.match(hf_name)
    if routed:
        return int(routed.group(2)) in ecfg.selected(routed.group(1))
    if _SHARED.match(hf_name):
        return ecfg.shared_experts
    return ecfg.non_expert_modules


def export_adapter(load_dir: str, out_dir: str, iteration: int | None = None) -> dict:
    """Write the adapter of an ESFT training checkpoint; returns {"tensors": n, "parameters": n, "iteration": i}."""
    from safetensors.torch import save_file

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model

    iteration = read_tracker(load_dir) if iteration is None else iteration
    meta = read_meta(load_dir, iteration)
    if meta.get("kind") != "esft" or not meta.get("expert_config"):
        raise UserError(f"--load {load_dir}: iteration {iteration} is not an ESFT training checkpoint "
                        f"(kind {meta.get('kind')!r}); use tools/convert_mcore_to_hf.py for the full model")
    ecfg = expert_config_from_json_dict(meta["expert_config"], f"{load_dir} (esft_meta.json)")
    cfg = parse_hf_config(meta["hf_config"], source=f"{load_dir} (esft_meta.json)")
    stored = getattr(torch, meta["params_dtype"])
    form = SourceForm(meta, os.path.join(load_dir, HF_ASSETS), f"{load_dir} (esft_meta.json)")
    base_of(load_dir, iteration)  # a trained-only checkpoint needs its base: checked before anything is built
    check_replaceable(out_dir, ADAPTER_SUFFIXES)  # before the weights are read (and again when it is replaced)
    par.initialize(par.ParallelConfig())
    model = build_model(cfg, params_dtype=stored, meta_device=True)
    pieces = list(convert._pieces(convert.strip_extra_state(model.sharded_state_dict())))
    # dist_checkpointing reads a stacked expert tensor whole (every expert of that key), like mcore_to_hf does per
    # layer; the unselected experts are dropped after loading.
    keys = set()
    for sh in pieces:
        piece = convert.hf_mapping.resolve(sh.key, sh.global_offset, sh.prepend_axis_num, cfg)
        names = convert.hf_mapping.qkv_hf_names(sh.key) if piece is None else [piece.hf_name]
        if any(in_adapter(n, ecfg) for n in names):
            keys.add(sh.key)
    wanted = []
    for sh in pieces:
        if sh.key in keys:
            dtype = torch.float32 if sh.key.endswith("router.expert_bias") else stored
            sh.data = torch.empty(sh.local_shape, dtype=dtype)
            wanted.append(sh)
    load_pieces(load_dir, iteration, wanted)  # a trained-only checkpoint: its base's weights, the trained on top
    tensors = [sh.data.reshape(sh.local_shape) for sh in wanted]
    out = {}
    for name, tensor in convert._hf_tensors(wanted, tensors, cfg):
        if in_adapter(name, ecfg):  # FP8 weights travel with their scales (the base's form: merge_adapter)
            out.update((n, t.contiguous()) for n, t in form.tensors(name, tensor))
    with atomic_directory(out_dir, prefix=".adapter-", replaceable=ADAPTER_SUFFIXES) as tmp:
        save_file(out, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(ecfg.to_json_dict(), fh)
    parameters = sum(t.numel() for n, t in out.items() if not n.endswith(SCALE_SUFFIX))  # FP8 scales are not
    return {"tensors": len(out), "parameters": parameters, "iteration": iteration}


def load_adapter(adapter_dir: str) -> tuple[ExpertConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not an ESFT adapter directory)")
    with open(cfg_path, encoding="utf-8") as fh:
        ecfg = expert_config_from_json_dict(json.load(fh), cfg_path)
    weights = {}
    for name in sorted(os.listdir(adapter_dir)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(adapter_dir, name)))
    return ecfg, weights


def merge_adapter(base_hf: str, adapter_dir: str, out_dir: str) -> int:
    """base HF checkpoint + adapter -> full HF checkpoint (adapter tensors replace the base's); returns how many."""
    from megatron_esft.checkpoint.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter

    ecfg, weights = load_adapter(adapter_dir)
    reader = SafetensorsReader(base_hf)
    unknown = sorted(set(weights) - set(reader.keys()))
    if unknown:
        raise UserError(f"{adapter_dir}: tensor {unknown[0]!r} is not in the base model {base_hf}")
    extra = sorted(n for n in weights if not in_adapter(n, ecfg))
    if extra:
        raise UserError(f"{adapter_dir}: tensor {extra[0]!r} is not trainable under its {ADAPTER_CONFIG}")
    with atomic_directory(out_dir, prefix=".adapter-merge-", replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        writer = ShardedSafetensorsWriter(tmp)
        for name in reader.keys():
            base = reader.get(name)
            if name in weights:
                new = weights[name]
                if tuple(new.shape) != tuple(base.shape) or new.dtype != base.dtype:
                    raise UserError(f"{adapter_dir}: {name} has {tuple(new.shape)} {new.dtype}, the base has "
                                    f"{tuple(base.shape)} {base.dtype}")
                base = new
            writer.add(name, base)
        writer.close()
        copy_hf_assets(base_hf, tmp)
    return len(weights)
