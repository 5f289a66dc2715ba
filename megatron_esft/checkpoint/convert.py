"""HF safetensors <-> Megatron-Core dist checkpoints, streaming.

* `hf_to_mcore`: builds the model's *shape* on the meta device for the requested TP/EP/PP, takes its sharded state
  dict, and points every piece at a zero-copy view of the matching HF tensor block (see hf_mapping), then saves.
  Nothing but the tensors being written is ever materialized by us.
* `mcore_to_hf`: builds the TP=EP=PP=1 shape on the meta device and loads one decoder layer at a time
  (dist_checkpointing reads only the requested keys), writing size-bounded safetensors shards as it goes. Names,
  order-independent content and dtypes equal the source HF checkpoint's.
* `load_model_weights`: loads a checkpoint into a live model (any layout) for training, evaluation and collection.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import torch
from tqdm import tqdm

from megatron_esft import parallel as par
from megatron_esft.atomic import HF_DIRECTORY_SUFFIXES, atomic_directory
from megatron_esft.checkpoint import hf_mapping
from megatron_esft.checkpoint.mcore_checkpoint import (
    HF_ASSETS,
    copy_hf_assets,
    hf_dtype_name,
    read_meta,
    read_tracker,
    save_checkpoint,
    strip_extra_state,
)
from megatron_esft.checkpoint.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from megatron_esft.checkpoint.trained_only import base_of, load_model_in_place, load_pieces
from megatron_esft.errors import UserError
from megatron_esft.models.hf_config import DeepSeekConfig, load_hf_config, load_raw_config, parse_hf_config
from megatron_esft.models.provider import build_model


def _pieces(sharded_state_dict: dict):
    """Apply factories (SwiGLU halves become separate pieces) and yield every ShardedTensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor):
            yield value


def _block(source: torch.Tensor, piece, sh) -> torch.Tensor:
    local = sh.local_shape
    offsets = sh.global_offset[sh.prepend_axis_num:]
    index = [slice(piece.row0, piece.row0 + local[0])]
    index += [slice(o, o + n) for o, n in zip(offsets[1:], local[1:])]
    return source[tuple(index)]


def _dtype_of(name: str) -> torch.dtype:
    try:
        return getattr(torch, name)
    except AttributeError:
        raise UserError(f"unknown dtype {name!r}") from None


def expected_hf_names(cfg: DeepSeekConfig, pieces) -> set[str]:
    """Every HF tensor name the pieces (ShardedTensors after factories) read from."""
    names = set()
    for sh in pieces:
        piece = hf_mapping.resolve(sh.key, sh.global_offset, sh.prepend_axis_num, cfg)
        names.update(hf_mapping.qkv_hf_names(sh.key) if piece is None else [piece.hf_name])
    return names


def hf_to_mcore(hf_dir: str, out_dir: str, parallel: par.ParallelConfig, dtype: str | None = None) -> str:
    cfg = load_hf_config(hf_dir)
    raw = load_raw_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    target = _dtype_of(dtype or cfg.torch_dtype)
    if os.path.exists(out_dir) and os.listdir(out_dir) and par.is_rank0():
        raise UserError(f"--out {out_dir}: directory exists and is not empty")
    par.initialize(parallel)
    model = build_model(cfg, parallel, params_dtype=target, meta_device=True)
    sharded = strip_extra_state(model.sharded_state_dict())
    qkv_cache: dict[int, torch.Tensor] = {}
    hf_dtypes = {}
    pieces = list(_pieces(sharded))
    missing = sorted(n for n in expected_hf_names(cfg, pieces) if n not in reader)
    if missing:
        raise UserError(f"{hf_dir}: tensor '{missing[0]}' expected by the config is missing "
                        f"({len(missing)} missing in all; wrong layer or expert count?)")
    for sh in tqdm(pieces, desc="mapping HF tensors", unit="tensor", disable=not par.is_rank0()):
        piece = hf_mapping.resolve(sh.key, sh.global_offset, sh.prepend_axis_num, cfg)
        if piece is None:  # fused qkv (standard attention)
            layer = hf_mapping.qkv_layer(sh.key)
            if layer not in qkv_cache:
                names = hf_mapping.qkv_hf_names(sh.key)
                qkv_cache[layer] = hf_mapping.qkv_fuse(*(reader.get(n) for n in names), cfg)
                hf_dtypes.update({n: hf_dtype_name(reader.dtype(n)) for n in names})
            source = qkv_cache[layer]
            piece = hf_mapping.Piece("qkv", sh.global_offset[0])
        else:
            source = reader.get(piece.hf_name)
            hf_dtypes[piece.hf_name] = hf_dtype_name(source.dtype)
        block = _block(source, piece, sh)
        if tuple(block.shape) != tuple(sh.local_shape):
            raise UserError(f"{hf_dir}: tensor '{piece.hf_name}' has shape {tuple(source.shape)}, which does not match "
                            f"the config (piece {sh.key} needs {tuple(sh.local_shape)})")
        keep_fp32 = sh.key.endswith("router.expert_bias")  # Megatron keeps the expert bias in fp32
        sh.data = block.to(torch.float32 if keep_fp32 else target)
    meta = {
        "hf_config": raw,
        "params_dtype": hf_dtype_name(target),
        "hf_dtypes": hf_dtypes,
        "saved_parallel": {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp},
        "kind": "base",
    }
    save_checkpoint(out_dir, 0, sharded, meta, hf_assets_from=hf_dir)
    return out_dir


def _layer_group(key: str) -> str:
    match = re.match(r"^decoder\.layers\.(\d+)\.", key)
    return f"layer{int(match.group(1)):06d}" if match else "top"


def mcore_to_hf(load_dir: str, out_dir: str, iteration: int | None = None, max_shard_bytes: int = 2 * 1024**3) -> str:
    iteration = read_tracker(load_dir) if iteration is None else iteration
    meta = read_meta(load_dir, iteration)
    cfg = parse_hf_config(meta["hf_config"], source=f"{load_dir} (esft_meta.json)")
    stored = _dtype_of(meta["params_dtype"])
    hf_dtypes = meta.get("hf_dtypes", {})
    base_of(load_dir, iteration)  # a trained-only checkpoint needs its base: checked before anything is built
    par.initialize(par.ParallelConfig())
    model = build_model(cfg, params_dtype=stored, meta_device=True)
    groups: dict[str, list] = defaultdict(list)
    sharded = strip_extra_state(model.sharded_state_dict())
    for sh in _pieces(sharded):
        groups[_layer_group(sh.key)].append(sh)
    with atomic_directory(out_dir, prefix=".hf-export-", replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for group in tqdm(sorted(groups), desc="exporting layers", unit="layer"):
            pieces = groups[group]
            for sh in pieces:
                dtype = torch.float32 if sh.key.endswith("router.expert_bias") else stored
                sh.data = torch.empty(sh.local_shape, dtype=dtype)
            load_pieces(load_dir, iteration, pieces)  # a trained-only checkpoint: its base's, the trained on top
            tensors = [sh.data.reshape(sh.local_shape) for sh in pieces]
            for name, tensor in _hf_tensors(pieces, tensors, cfg):
                writer.add(name, tensor.to(_dtype_of(hf_dtypes.get(name, meta["params_dtype"]))))
            for sh in pieces:  # the writer holds what it still needs; drop this layer's buffers
                sh.data = None
            del tensors
        writer.close()
        assets = os.path.join(load_dir, HF_ASSETS)
        if os.path.isdir(assets):
            copy_hf_assets(assets, tmp)
    return out_dir


def _hf_tensors(pieces, tensors, cfg: DeepSeekConfig):
    """Full-layout pieces (TP=EP=PP=1) and their loaded tensors -> HF tensors."""
    for sh, tensor in zip(pieces, tensors):
        piece = hf_mapping.resolve(sh.key, sh.global_offset, sh.prepend_axis_num, cfg)
        if piece is None:
            yield from zip(hf_mapping.qkv_hf_names(sh.key), hf_mapping.qkv_split(tensor, cfg))
        else:
            yield piece.hf_name, tensor


def load_model_weights(model, load_dir: str, iteration: int | None = None) -> dict:
    """Load a checkpoint's model weights into `model` (this rank's shard of any TP/EP/PP layout); returns its meta."""
    iteration = read_tracker(load_dir) if iteration is None else iteration
    meta = read_meta(load_dir, iteration)
    load_model_in_place(load_dir, iteration, model)  # either kind of checkpoint (trained_only.py)
    return meta


def check_same_model(meta: dict, cfg: DeepSeekConfig, where: str) -> None:
    saved = parse_hf_config(meta["hf_config"]).summary()
    for field, value in cfg.summary().items():
        if saved[field] != value:
            raise UserError(f"{where}: checkpoint has {field}={saved[field]}, the model has {value}")
