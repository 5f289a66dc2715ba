"""Training checkpoints on top of mcore_checkpoint: model + optimizer + per-rank RNG + data position + schedule.

One checkpoint is one `DIR/iter_XXXXXXX/` written atomically by `mcore_checkpoint.save_checkpoint`:

* `model`: the full model (frozen parameters included) in the base checkpoint's layout and keys, so
  `convert_mcore_to_hf.py` turns a trained checkpoint into the merged HF model and any TP/EP/PP can load it;
* `optimizer`: Megatron's distributed-optimizer state in the `fully_reshardable` format (loadable under another
  TP/EP/PP/DP layout);
* `rng_state`: a ShardedObject with one entry per global rank (restored only when the world size is unchanged);
* `esft_meta.json`: the base checkpoint's `hf_config` / `params_dtype` / `hf_dtypes` (what the HF exporter needs)
  plus `kind` ("esft" | "full"), `finetune_mode`, `expert_config`, and `train_state` (iteration, consumed samples,
  data-loader state, LR-scheduler state, best validation loss, parallel layout).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_esft.parallel import all_reduce

from megatron_esft.checkpoint.mcore_checkpoint import (
    HF_ASSETS,
    META,
    iteration_dir,
    load_sharded,
    read_meta,
    read_tracker,
    save_checkpoint,
    saved_iterations,
    strip_extra_state,
)
from megatron_esft.checkpoint.trained_only import (
    MODEL_WEIGHTS,
    TRAINED,
    load_model_in_place,
    per_expert,
    trained_model_state,
)
from megatron_esft.errors import UserError

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
TRAINED_KINDS = ("esft", "full")


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(value) -> object:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = _world()
    return ShardedObject("rng_state", value, (world,), (rank,), replica_id=0)


def _model_sharded(model) -> dict:
    return strip_extra_state(model.sharded_state_dict())


def _per_expert_optimizer_keys(optimizer_sd: dict):
    """Give each routed expert's optimizer state its own dist-ckpt key (`<key>.expert<g>`); returns the factories.

    ESFT trains a subset of a layer's experts, so the optimizer state of `...experts.experts.linear_fc1.weight`
    covers only some slices of the expert axis, which dist_checkpointing's access validation rejects (every global
    tensor must be covered). One key per global expert is always fully covered, and still reshards freely: a rank
    finds its experts' state by global expert id under any EP layout. Factories (the SwiGLU gate/up split) are
    applied here, so the caller must re-merge loaded values with `apply_factory_merges(loaded, factories)`.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories

    factories, _ = extract_matching_values(optimizer_sd, lambda x: isinstance(x, ShardedTensorFactory),
                                           return_lists_as_dicts=True)
    apply_factories(optimizer_sd)
    dict_list_map_inplace(per_expert, optimizer_sd)
    return factories


def live_optimizers(optimizer) -> list:
    """The Megatron optimizers that hold parameters. ESFT often leaves the dense optimizer empty (its inner
    optimizer is None), which ChainedOptimizer's own (sharded_)state_dict cannot handle."""
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None and any(g["params"] for g in o.optimizer.param_groups)]


def optimizer_step(optimizer) -> int:
    steps = {int(g["step"]) for o in live_optimizers(optimizer) for g in o.optimizer.param_groups
             if g["params"] and "step" in g}
    if not steps:  # torch AdamW keeps the step per parameter
        steps = {int(st["step"]) for o in live_optimizers(optimizer) for st in o.optimizer.state.values()
                 if "step" in st}
    step = torch.tensor([max(steps) if steps else 0], dtype=torch.float64)
    if dist.is_initialized():  # a rank (PP stage, EP rank) may train nothing at all: take the step of those that do
        all_reduce(step, op=dist.ReduceOp.MAX)
    return int(step.item())


def _optimizer_param_states(optimizer, model_sd: dict, is_loading: bool) -> tuple[list, list, list]:
    """Per live optimizer: its (state dict, param_state with per-expert keys, factories)."""
    full, param_states, factories = [], [], []
    for opt in live_optimizers(optimizer):
        sd = opt.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
        factories.append(_per_expert_optimizer_keys(sd["param_state"]))
        full.append(sd)
        param_states.append(sd["param_state"])
    return full, param_states, factories


def save_training_checkpoint(root: str, iteration: int, model, optimizer, meta: dict, hf_assets_from: str | None,
                             async_queue=None, on_published=None, trained_only: bool = False,
                             strategy=None, retain_interval: int | None = None,
                             protected: frozenset[int] = frozenset(), save_optimizer: bool = True,
                             save_rng: bool = True):
    """Collective. `model`: the unwrapped GPTModel of this rank; `meta`: JSON-able, written by rank 0;
    `async_queue` / `on_published`: a background save (mcore_checkpoint.save_checkpoint); `trained_only`: the model
    part holds the trained parameters only, the rest comes from `meta["base_checkpoint"]` (trained_only.py);
    `strategy`: the run's `mcore_checkpoint.SaveStrategy` (--ckpt-fully-parallel-save,
    --ckpt-assume-constant-structure; None: Megatron-Core's default writer);
    `retain_interval` / `protected`: --save-retain-interval (checkpoint/retention.py); without `save_optimizer` /
    `save_rng` (Megatron-LM's --no-save-optim / --no-save-rng) that part is left out and the meta says so
    (`optimizer_saved` / `rng_saved` false): a resume then starts Adam afresh / keeps the seeded RNG states.

    Only the optimizer's per-parameter tensors go into the checkpoint (keys: `optimizer.state.{param,exp_avg,
    exp_avg_sq}.<model key>[.expert<g>]`, independent of how Megatron splits parameters over its dense and expert
    optimizers in a given layout); the step count goes into the meta, the hyper-parameters come from the command
    line and the LR schedule."""
    model_sd = _model_sharded(model)
    state = {"model": trained_model_state(model) if trained_only else model_sd}
    if save_optimizer:
        state["optimizer"] = _optimizer_param_states(optimizer, model_sd, is_loading=False)[1]
    if save_rng:
        state["rng_state"] = _rng_sharded(rng_state())
    rank, world = _world()
    meta = dict(meta, world_size=world, optimizer_step=optimizer_step(optimizer))
    meta.update({f"{part}_saved": False for part, saved in (("optimizer", save_optimizer), ("rng", save_rng))
                 if not saved})
    if trained_only:
        meta[MODEL_WEIGHTS] = TRAINED
    return save_checkpoint(root, iteration, state, meta, hf_assets_from=hf_assets_from, async_queue=async_queue,
                           on_published=on_published, strategy=strategy,
                           retain_interval=retain_interval, protected=protected)


def load_model_only(root: str, iteration: int, model) -> None:
    """The model weights of a checkpoint of either kind (trained_only.load_model_in_place), nothing else."""
    load_model_in_place(root, iteration, model)


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors (and `step`), which the loading sharded state dict needs.

    This is Megatron's own dummy step (zero grads). It moves the weights by weight decay, which does not matter:
    the model weights, the fp32 main weights and the step count are all overwritten by the load that follows.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "optimizer", None) is not None and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
            _keep_step_on_load(opt)


def _keep_step_on_load(opt) -> None:
    """megatron-core 0.16.1 + torch AdamW (no Apex/TE): a loaded parameter state has exp_avg/exp_avg_sq/param but
    no per-parameter `step`, while `_set_main_param_and_optimizer_states` copies every key of the live state (which
    torch's AdamW gives a `step`) -> KeyError. `load_state_dict` has already set `step` from the checkpoint's param
    groups by then, so the live value is the right one to keep. Instance-level, only for checkpoint loading."""
    if getattr(opt, "_esft_step_shim", False):
        return
    original = type(opt)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors, _opt=opt):
        if "step" not in tensors and not _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return original(_opt, model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    opt._esft_step_shim = True


def _unshare_step_tensors(optimizer) -> None:
    """megatron-core 0.16.1 without Apex/TE loads one `step` tensor object into every parameter's state; torch's
    AdamW increments each parameter's `step` in place, so a shared tensor advances once per parameter per step and
    the bias correction goes wrong after a resume. Give every parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def load_training_checkpoint(root: str, iteration: int, model, optimizer, restore_rng: bool, step: int,
                             load_optimizer: bool = True) -> None:
    """Collective: model weights, optimizer state (`step`: the optimizer step saved in the meta) and, when
    `restore_rng`, this rank's RNG states. Without `load_optimizer` (Megatron-LM's --no-load-optim) the optimizer
    starts afresh from the loaded weights: no Adam moments, step 0, fp32 main weights copied from the model's."""
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges

    state, full, factories = {}, [], []
    if load_optimizer:
        _init_optimizer_state(optimizer)
        full, param_states, factories = _optimizer_param_states(optimizer, _model_sharded(model), is_loading=True)
        state["optimizer"] = param_states
    if restore_rng:
        state["rng_state"] = _rng_sharded(None)
    loaded = load_sharded(root, iteration, state) if state else {}
    load_model_in_place(root, iteration, model)  # either kind of checkpoint (trained_only.py)
    if load_optimizer:
        for opt, sd, param_state, facs in zip(live_optimizers(optimizer), full, loaded["optimizer"], factories):
            sd["param_state"] = apply_factory_merges(param_state, facs)
            for group in sd["optimizer"]["param_groups"]:
                group["step"] = step
            opt.load_state_dict(sd)
        _unshare_step_tensors(optimizer)
    else:
        optimizer.reload_model_params()  # its main weights were copied from the model before the load
    if restore_rng:
        value = loaded["rng_state"]
        set_rng_state(value if isinstance(value, dict) else value.data)


def describe_load(root: str, iteration: int | None = None) -> tuple[int, dict]:
    """(iteration, meta) of the newest checkpoint under `root`, or of `iteration` (Megatron-LM's --ckpt-step); a
    UserError when there is none."""
    latest = read_tracker(root)
    if iteration is None:
        iteration = latest
    elif not os.path.isfile(os.path.join(iteration_dir(root, iteration), META)):
        saved = saved_iterations(root)
        raise UserError(f"--ckpt-step {iteration}: --load {root} has no complete checkpoint of that iteration "
                        f"(saved: {', '.join(map(str, saved)) or 'none'})")
    return iteration, read_meta(root, iteration)


def is_training_checkpoint(meta: dict) -> bool:
    return meta.get("kind") in TRAINED_KINDS and "train_state" in meta


__all__ = ["HF_ASSETS", "save_training_checkpoint", "load_training_checkpoint", "load_model_only", "describe_load",
           "is_training_checkpoint"]
