"""Training checkpoints that hold only the trained weights (pretrain_esft.py --save-trained-weights-only).

ESFT changes ~10 % of a DeepSeek MoE model, yet a full checkpoint rewrites every frozen weight each time: 29 of the
~44 GiB of a V2-Lite ESFT checkpoint, ~1.3 TB of a V3 one. With this option the `model` part of a checkpoint holds the
trained parameters only (routed experts under one key per global expert, `<key>.expert<g>`, like their optimizer
state, so that any expert-parallel layout finds them), its meta says `"model_weights": "trained"`, and the frozen
weights come from the checkpoint it names as `base_checkpoint` (the converted base model, or with --finetune the
training checkpoint it started from), which must stay where it was. Optimizer state, RNG, data position and schedule
are saved as always.

Every reader of model weights goes through `load_pieces` (or `load_model_in_place`): the base's weights first
(recursively, for a chain of such checkpoints), then the trained ones on top. The model's shards are plain
ShardedTensors whose data are views of its parameters (factories applied: the SwiGLU gate/up halves and the grouped
experts' rows are views), so loading writes the parameters in place.
"""

from __future__ import annotations

import dataclasses
import os

from megatron_esft.checkpoint.mcore_checkpoint import (
    META,
    iteration_dir,
    load_sharded,
    read_meta,
    strip_extra_state,
)
from megatron_esft.errors import UserError

EXPERT_AXIS_KEY = ".mlp.experts.experts."  # SequentialMLP's sharded key: the global expert axis is prepended
MODEL_WEIGHTS = "model_weights"  # meta field; "trained" marks a checkpoint of this kind
TRAINED = "trained"


def per_expert(value):
    """A routed expert's ShardedTensor under its own key `<key>.expert<g>` (the global expert axis dropped): one
    expert is always fully covered by the rank that holds it, whatever subset of a layer's experts is stored."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(value, ShardedTensor) and EXPERT_AXIS_KEY in value.key and value.prepend_axis_num == 1:
        return dataclasses.replace(
            value, key=f"{value.key}.expert{value.global_offset[0]}", global_shape=value.global_shape[1:],
            global_offset=value.global_offset[1:], prepend_axis_num=0,
            axis_fragmentations=value.axis_fragmentations[1:] if value.axis_fragmentations else None)
    return value


def model_pieces(model) -> list:
    """This rank's model shards as plain ShardedTensors (factories applied) whose data are views of the
    parameters."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = strip_extra_state(model.sharded_state_dict())
    apply_factories(sharded)
    return [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]


def is_trained_only(meta: dict) -> bool:
    return meta.get(MODEL_WEIGHTS) == TRAINED


def trained_model_state(model) -> dict:
    """The `model` part of a trained-only checkpoint: the shards that lie in a parameter requiring grad."""
    spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
             for p in model.parameters() if p.requires_grad and p.numel()]
    state = {}
    for i, piece in enumerate(model_pieces(model)):
        start = piece.data.data_ptr()
        if piece.data.numel() and any(lo <= start < hi for lo, hi in spans):
            state[f"{i}"] = per_expert(piece)
    return state


def _saved_keys(root: str, iteration: int) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(iteration_dir(root, iteration)).read_metadata().state_dict_metadata)


def _load_into(root: str, iteration: int, pieces: dict) -> None:
    """Load each piece's tensor into its data. dist_checkpointing loads into the given tensors but reshapes the
    ShardedTensors it is handed (prepended axes), so it gets copies of them and the pieces stay reusable."""
    loaded = load_sharded(root, iteration, {name: dataclasses.replace(piece) for name, piece in pieces.items()})
    for name, piece in pieces.items():
        value = loaded[name]
        if value.data_ptr() != piece.data.data_ptr():
            piece.data.copy_(value.reshape(piece.data.shape))


def base_of(root: str, iteration: int) -> tuple[str, int] | None:
    """The checkpoint a trained-only checkpoint takes its other weights from (None for a full one), checked down the
    whole chain before anything is loaded or written: a UserError when one of them is gone."""
    meta = read_meta(root, iteration)
    if not is_trained_only(meta):
        return None
    base = meta.get("base_checkpoint") or {}
    base_root, base_iteration = base.get("load"), base.get("iteration")
    if base_root is None or not os.path.isfile(os.path.join(iteration_dir(base_root, base_iteration), META)):
        raise UserError(f"{iteration_dir(root, iteration)}: holds only the trained weights, and its base checkpoint "
                        f"{base_root} (iteration {base_iteration}) with the frozen ones is not there any more")
    base_of(base_root, base_iteration)
    return base_root, base_iteration


def load_pieces(root: str, iteration: int, pieces: list) -> None:
    """Fill every piece's data (in place) with the model weights of checkpoint `root` at `iteration`: read directly
    from a full checkpoint; from a trained-only one, the base checkpoint's weights overlaid with the trained ones."""
    base = base_of(root, iteration)
    if base is None:
        _load_into(root, iteration, {f"{i}": p for i, p in enumerate(pieces)})
        return
    load_pieces(*base, pieces)
    saved = _saved_keys(root, iteration)
    overlay = {}
    for i, piece in enumerate(pieces):
        stored = per_expert(piece)
        if stored.key in saved:
            overlay[f"{i}"] = stored
    _load_into(root, iteration, overlay)


def load_model_in_place(root: str, iteration: int, model) -> None:
    """Load a checkpoint's model weights (either kind) into `model`, this rank's shard of any TP/EP/PP layout."""
    load_pieces(root, iteration, model_pieces(model))
