"""Megatron-Core checkpoints in the Megatron-LM layout, written atomically.

```
DIR/latest_checkpointed_iteration.txt      the newest complete iteration (Megatron-LM's tracker file)
DIR/iter_0000000/                          dist_checkpointing (torch_dist) files: loadable at any TP/EP/PP
DIR/iter_0000000/esft_meta.json            what this checkpoint is: HF config, dtype, iteration, expert config, ...
DIR/hf_assets/                             the source HF config.json, generation config and tokenizer files
```

A save goes to `DIR/.iter_0000042.tmp-<nonce>/` and is renamed into place only when every rank has finished; the
tracker file is replaced last with `os.replace`. A process killed mid-save therefore leaves the previous iteration
and tracker untouched (the orphaned temp directory is removed by the next save).

`_extra_state` entries (Transformer Engine FP8 metadata; `None` in the local spec) are never saved or loaded, so
checkpoints move freely between the local and TE layer specs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

import torch
import torch.distributed as dist

from megatron_esft.checkpoint import retention
from megatron_esft.checkpoint.fp8_blocks import FP8_SOURCE_SCALES
from megatron_esft.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
META = "esft_meta.json"
HF_ASSETS = "hf_assets"
FORMAT = "megatron_esft"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int:
    if not os.path.isdir(root):
        raise UserError(f"--load {root}: directory does not exist")
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        raise UserError(f"--load {root}: no {TRACKER} (not a megatron_esft checkpoint directory)")
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def saved_iterations(root: str) -> list[int]:
    """The iterations under `root` whose save completed (their metadata file is written last, on publishing)."""
    names = (re.fullmatch(r"iter_(\d{7})", name) for name in os.listdir(root)) if os.path.isdir(root) else ()
    return sorted(int(m.group(1)) for m in names if m and os.path.isfile(os.path.join(root, m.group(0), META)))


def read_meta(root: str, iteration: int | None = None) -> dict:
    """The metadata of `iteration` (default: the tracker's); a UserError naming what is there when it is missing."""
    explicit = iteration is not None
    iteration = iteration if explicit else read_tracker(root)
    path = os.path.join(iteration_dir(root, iteration), META)
    if not os.path.exists(path):
        if explicit and not os.path.isdir(iteration_dir(root, iteration)):
            saved = ", ".join(map(str, saved_iterations(root))) or "none"
            raise UserError(f"{root}: no checkpoint of iteration {iteration} (saved: {saved})")
        raise UserError(f"{path}: missing (incomplete or foreign checkpoint)")
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} checkpoint")
    return meta


def strip_extra_state(sharded_state_dict: dict) -> dict:
    return {k: v for k, v in sharded_state_dict.items() if not k.endswith("_extra_state")}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SaveStrategy:
    """How a run writes its checkpoints: Megatron-Core's default torch_dist writer, made once and kept across saves
    (Megatron-LM keeps it in its checkpointing context).

    `fully_parallel` (Megatron-LM's --ckpt-fully-parallel-save): by default a tensor held by several ranks (the dense
    weights on every data-parallel replica) is written by its first replica alone, so data-parallel rank 0 writes
    every dense weight while the others wait; the wrapper assigns each such tensor to one of its holders, balancing
    the bytes per rank (only metadata is exchanged, over the whole world: it covers every replication pattern,
    expert weights included).

    `constant_structure` (Megatron-LM's --ckpt-assume-constant-structure): every save of the run has the same tensors
    and shards, so the writer plans once and reuses the plan (torch_dist's cached save plans and global metadata,
    checked equal over the first two saves, then no longer gathered from every rank), the fully parallel wrapper
    reuses its distribution, and saves after the first skip the sharding validation (an all-gather of every rank's
    shard metadata). A save whose structure differs from the first's would be written with the old plan."""

    def __init__(self, fully_parallel: bool = False, constant_structure: bool = False):
        self.fully_parallel, self.constant_structure = fully_parallel, constant_structure
        self._strategy = None
        self.saves = 0

    @property
    def megatron_strategy(self):
        """The Megatron-Core strategy the saves so far used (None before the first, or for its default)."""
        return self._strategy

    def next_save(self):
        """(Megatron-Core sharded strategy or None for its default, validate_access_integrity) for the next save."""
        if self._strategy is None and (self.constant_structure or self.fully_parallel):
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

            strategy = get_default_save_sharded_strategy()  # a new instance per call: its caches are this run's
            strategy.use_cached_ckpt_structure = self.constant_structure
            if self.fully_parallel and dist.is_initialized() and dist.get_world_size() > 1:
                strategy = FullyParallelSaveStrategyWrapper(strategy, dist.group.WORLD, self.constant_structure)
            self._strategy = strategy
        validate = not (self.constant_structure and self.saves > 0)
        self.saves += 1
        return self._strategy, validate


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, meta: dict, hf_assets_from: str | None = None,
                    rank0_files: dict[str, bytes] | None = None, async_queue=None, on_published=None,
                    strategy: SaveStrategy | None = None, retain_interval: int | None = None,
                    protected: frozenset[int] = frozenset(), hf_asset_files: dict[str, bytes] | None = None) -> str:
    """Collective: every rank passes its sharded state dict; rank 0 writes metadata and publishes the iteration.
    `strategy`: the run's `SaveStrategy`, kept across its saves (None: Megatron-Core's default writer, no fully
    parallel save); `retain_interval`, `protected`:
    which earlier iteration goes once this one is published (--save-retain-interval, retention.py).

    With `async_queue` (Megatron-Core's `AsyncCallsQueue`, Megatron-LM's --async-save) the tensors are staged now and
    written by a background process; the iteration is published (renamed into place, tracker updated, then
    `on_published()` called) when the queue finalizes the request, a collective the trainer runs between iterations.
    Until then the previous iteration stays the latest. A save waits for the queue's earlier saves first."""
    from megatron.core import dist_checkpointing

    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)  # its temporary directory is cleaned up below
    final = iteration_dir(root, iteration)
    tmp = _broadcast_str(os.path.join(root, f".iter_{iteration:07d}.tmp-{uuid.uuid4().hex[:8]}"))
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a killed save
            if (name.startswith(".iter_") and ".tmp-" in name) or retention.is_leftover(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    def publish():
        _publish(root, iteration, tmp, meta, hf_assets_from, rank0_files, retain_interval, protected, hf_asset_files)
        if on_published is not None:
            on_published()

    sharded_strategy, validate = (strategy or SaveStrategy()).next_save()
    if async_queue is None:
        dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy, validate_access_integrity=validate)
        _barrier()
        publish()
    else:
        # staging copies device tensors to host memory; the writer is a process forked when the request is
        # scheduled, so host tensors too are written with the values of this moment (tests/checkpoint)
        request = dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy, validate_access_integrity=validate,
                                          async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def _publish(root: str, iteration: int, tmp: str, meta: dict, hf_assets_from: str | None,
             rank0_files: dict[str, bytes] | None, retain_interval: int | None = None,
             protected: frozenset[int] = frozenset(), hf_asset_files: dict[str, bytes] | None = None) -> None:
    """Collective, after every rank's shards are in `tmp`: rank 0 adds the meta (and extra files), renames `tmp` to the
    iteration's directory, points the tracker at it and removes the previous latest iteration if it is not to be
    retained (retention.py)."""
    final = iteration_dir(root, iteration)
    if _rank() == 0:
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as fh:
            json.dump(dict(meta, format=FORMAT, iteration=iteration), fh, indent=2, sort_keys=True)
        for name, data in (rank0_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        if hf_assets_from and os.path.abspath(hf_assets_from) != os.path.abspath(os.path.join(root, HF_ASSETS)):
            assets_tmp = os.path.join(root, f".{HF_ASSETS}.tmp-{uuid.uuid4().hex[:8]}")
            copy_hf_assets(hf_assets_from, assets_tmp)
            for name, data in (hf_asset_files or {}).items():
                with open(os.path.join(assets_tmp, name), "wb") as fh:
                    fh.write(data)
            if os.path.exists(os.path.join(root, HF_ASSETS)):
                shutil.rmtree(os.path.join(root, HF_ASSETS))
            os.replace(assets_tmp, os.path.join(root, HF_ASSETS))
        if os.path.exists(final):
            old = final + f".old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        tracker = os.path.join(root, TRACKER)
        text = open(tracker, encoding="utf-8").read().strip() if os.path.exists(tracker) else ""
        previous = int(text) if text.isdigit() else None
        tracker_tmp = os.path.join(root, f".{TRACKER}.tmp")
        with open(tracker_tmp, "w", encoding="utf-8") as fh:
            fh.write(str(iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tracker_tmp, tracker)
        gone = retention.to_remove(previous, iteration, retain_interval, set(protected))
        if gone is not None and retention.remove_iteration(iteration_dir(root, gone)):
            print(f"removed checkpoint at iteration {gone:7d} from {root} (superseded by iteration {iteration})",
                  flush=True)
    _barrier()


def load_sharded(root: str, iteration: int, sharded_state_dict: dict) -> dict:
    """Load `sharded_state_dict` (any subset of the saved keys, any parallel layout) from an iteration."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, iteration_dir(root, iteration))


# Files of a HF model directory that travel with a checkpoint (everything except weights).
_ASSET_SUFFIXES = (".json", ".model", ".txt", ".py", ".tiktoken", ".jinja")


def copy_hf_assets(src: str, dst: str, to_hf: bool = False) -> None:
    """Config, tokenizer and generation files (not weights) from `src` to `dst`; between checkpoints also the FP8
    source scales (`to_hf`: a HF export, which writes its own)."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name == "model.safetensors.index.json":
            continue
        if name.endswith(_ASSET_SUFFIXES) or (name == FP8_SOURCE_SCALES and not to_hf):
            shutil.copy2(path, os.path.join(dst, name))


def hf_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
