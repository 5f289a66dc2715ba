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
import shutil
import tempfile
from collections import defaultdict

import torch
from tqdm import tqdm

from megatron_esft import parallel as par
from megatron_esft.atomic import HF_DIRECTORY_SUFFIXES, atomic_directory
from megatron_esft.checkpoint import fp8_blocks, hf_mapping
from megatron_esft.checkpoint.fp8_blocks import FP8_SOURCE_SCALES, BlockFp8Format
from megatron_esft.checkpoint.mcore_checkpoint import (
    HF_ASSETS,
    copy_hf_assets,
    hf_dtype_name,
    read_meta,
    read_tracker,
    save_checkpoint,
    strip_extra_state,
)
from megatron_esft.checkpoint.safetensors_io import (
    ScratchTensors,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    return_freed_memory,
)
from megatron_esft.checkpoint.trained_only import base_of, load_model_in_place, load_pieces
from megatron_esft.errors import UserError
from megatron_esft.models.hf_config import DeepSeekConfig, load_hf_config, load_raw_config, parse_hf_config
from megatron_esft.models.provider import build_model


FP8_SCRATCH_PREFIX = ".fp8-dequant-"  # the directory an FP8 checkpoint is dequantized into (hf_to_mcore)


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


class SourceWeights:
    """The source HF tensors in the form the model stores them: DeepSeek's FP8 blocks dequantized (fp8_blocks.py)
    into file-backed scratch (in memory when `scratch` is None), every dtype checked. Values are cached per name
    (several pieces read one tensor)."""

    def __init__(self, reader: SafetensorsReader, hf_dir: str, fmt: BlockFp8Format | None, target: torch.dtype,
                 scratch: ScratchTensors | None):
        self.reader, self.hf_dir, self.fmt, self.target, self.scratch = reader, hf_dir, fmt, target, scratch
        self._dequantized: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        if not tensor.dtype.is_floating_point:
            raise UserError(f"{self.hf_dir}: tensor '{name}' has dtype {hf_dtype_name(tensor.dtype)}; a weight must "
                            "be floating point")
        if not fp8_blocks.is_float8(tensor.dtype):
            return tensor
        if name not in self._dequantized:
            values = self._dequantize(name, tensor)  # first: it names what is wrong with the tensor or config
            if self.scratch is None:
                self._dequantized[name] = values
            else:
                self._dequantized[name] = self.scratch.store(values)
                del values
                return_freed_memory()  # the dequantization's temporaries and in-memory result
        return self._dequantized[name]

    def _dequantize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        where = f"{self.hf_dir}: tensor '{name}'"
        if self.fmt is None:
            raise UserError(f"{where} is {hf_dtype_name(tensor.dtype)} but config.json has no quantization_config")
        if tensor.dtype != torch.float8_e4m3fn:
            raise UserError(f"{where} is {hf_dtype_name(tensor.dtype)}; the config declares e4m3")
        scale = fp8_blocks.scale_name(name)
        if scale not in self.reader:
            raise UserError(f"{where} is FP8 but its scales '{scale}' are missing")
        scale_tensor = self.reader.get(scale)
        expected = self.fmt.scale_shape(tuple(tensor.shape))
        if tensor.dim() != 2 or tuple(scale_tensor.shape) != expected:
            raise UserError(f"{self.hf_dir}: tensor '{scale}' has shape {tuple(scale_tensor.shape)}; blocks of "
                            f"{self.fmt.block} over {tuple(tensor.shape)} need {expected}")
        return self.fmt.dequantize(tensor, scale_tensor, self.target)

    def dtypes(self) -> dict[str, str]:
        """Every source tensor's dtype (FP8 scales included): what the export writes back. All of them, not only
        those this rank maps: rank 0 writes the record, and under EP/PP other ranks hold other experts and layers."""
        return {name: hf_dtype_name(self.reader.dtype(name)) for name in self.reader.keys()}

    def source_scales(self) -> bytes:
        """Every FP8 weight's scales, as a safetensors file (the export keeps them for the blocks it did not change)."""
        from safetensors.torch import save

        names = [n for n in self.reader.keys() if fp8_blocks.is_float8(self.reader.dtype(n))
                 and fp8_blocks.scale_name(n) in self.reader]
        return save({fp8_blocks.scale_name(n): self.reader.get(fp8_blocks.scale_name(n)).contiguous() for n in names})


def hf_to_mcore(hf_dir: str, out_dir: str, parallel: par.ParallelConfig, dtype: str | None = None,
                scratch_dir: str | None = None) -> str:
    """`scratch_dir`: where an FP8 checkpoint's weights are dequantized to (default: beside `out_dir`); each rank
    needs as much free disk there as its shard of the model in `dtype` while the conversion runs."""
    cfg = load_hf_config(hf_dir)
    raw = load_raw_config(hf_dir)
    fmt = BlockFp8Format.from_hf_config(raw, os.path.join(hf_dir, "config.json"))
    reader = SafetensorsReader(hf_dir)
    target = _dtype_of(dtype or cfg.torch_dtype)
    if os.path.exists(out_dir) and os.listdir(out_dir) and par.is_rank0():
        raise UserError(f"--out {out_dir}: directory exists and is not empty")
    par.initialize(parallel)
    model = build_model(cfg, parallel, params_dtype=target, meta_device=True)
    sharded = strip_extra_state(model.sharded_state_dict())
    pieces = list(_pieces(sharded))
    missing = sorted(n for n in expected_hf_names(cfg, pieces) if n not in reader)
    if missing:
        raise UserError(f"{hf_dir}: tensor '{missing[0]}' expected by the config is missing "
                        f"({len(missing)} missing in all; wrong layer or expert count?)")
    scratch_parent = scratch_dir or os.path.dirname(os.path.abspath(out_dir))
    if fmt and not os.path.isdir(scratch_parent):
        raise UserError(f"--scratch-dir {scratch_parent}: no such directory")
    scratch = tempfile.mkdtemp(prefix=FP8_SCRATCH_PREFIX, dir=scratch_parent) if fmt else None
    try:
        weights = SourceWeights(reader, hf_dir, fmt, target, ScratchTensors(scratch) if fmt else None)
        _map_pieces(weights, pieces, cfg, target)
        meta = {
            "hf_config": raw,
            "params_dtype": hf_dtype_name(target),
            "hf_dtypes": weights.dtypes(),
            "saved_parallel": {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp},
            "kind": "base",
        }
        assets = {FP8_SOURCE_SCALES: weights.source_scales()} if fmt and par.is_rank0() else None
        save_checkpoint(out_dir, 0, sharded, meta, hf_assets_from=hf_dir, hf_asset_files=assets)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _map_pieces(weights: SourceWeights, pieces, cfg: DeepSeekConfig, target: torch.dtype) -> None:
    """Point every piece at its block of the source tensors."""
    qkv_cache: dict[int, torch.Tensor] = {}
    for sh in tqdm(pieces, desc="mapping HF tensors", unit="tensor", disable=not par.is_rank0()):
        piece = hf_mapping.resolve(sh.key, sh.global_offset, sh.prepend_axis_num, cfg)
        if piece is None:  # fused qkv (standard attention)
            layer = hf_mapping.qkv_layer(sh.key)
            if layer not in qkv_cache:
                names = hf_mapping.qkv_hf_names(sh.key)
                qkv_cache[layer] = hf_mapping.qkv_fuse(*(weights.get(n) for n in names), cfg)
            source = qkv_cache[layer]
            piece = hf_mapping.Piece("qkv", sh.global_offset[0])
        else:
            source = weights.get(piece.hf_name)
        block = _block(source, piece, sh)
        if tuple(block.shape) != tuple(sh.local_shape):
            raise UserError(f"{weights.hf_dir}: tensor '{piece.hf_name}' has shape {tuple(source.shape)}, which does "
                            f"not match the config (piece {sh.key} needs {tuple(sh.local_shape)})")
        keep_fp32 = sh.key.endswith("router.expert_bias")  # Megatron keeps the expert bias in fp32
        sh.data = block.to(torch.float32 if keep_fp32 else target)


def _layer_group(key: str) -> str:
    match = re.match(r"^decoder\.layers\.(\d+)\.", key)
    return f"layer{int(match.group(1)):06d}" if match else "top"


def mcore_to_hf(load_dir: str, out_dir: str, iteration: int | None = None, max_shard_bytes: int = 2 * 1024**3) -> str:
    iteration = read_tracker(load_dir) if iteration is None else iteration
    meta = read_meta(load_dir, iteration)
    cfg = parse_hf_config(meta["hf_config"], source=f"{load_dir} (esft_meta.json)")
    stored = _dtype_of(meta["params_dtype"])
    assets = os.path.join(load_dir, HF_ASSETS)
    form = fp8_blocks.SourceForm(meta, assets, f"{load_dir} (esft_meta.json)")
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
                for out_name, out in form.tensors(name, tensor):
                    writer.add(out_name, out)
            for sh in pieces:  # the writer holds what it still needs; drop this layer's buffers
                sh.data = None
            del tensors
            return_freed_memory()
        writer.close()
        if os.path.isdir(assets):
            copy_hf_assets(assets, tmp, to_hf=True)
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
