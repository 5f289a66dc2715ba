"""Checkpoint layout of the frozen-aware experts: exactly SequentialMLP's, whatever the trainable/frozen split.

On disk (dist_checkpointing) every expert is written under SequentialMLP's sharded keys, global offsets, replica ids
and SwiGLU split (`{prefix}experts.linear_fc1.weight` with the global expert axis prepended, gate/up halves as two
shards); `state_dict()` uses SequentialMLP's names (`local_experts.{j}.linear_fc{1,2}.weight` and `._extra_state`).
The per-expert entries are produced by Megatron-Core's own helpers (`make_sharded_tensors_for_checkpoint`,
`apply_swiglu_sharded_factory`, `replace_prefix_for_sharding`), called the way SequentialMLP -> MLP -> Column/Row
ParallelLinear call them, so the two modules cannot drift apart.

Each group Parameter `[E_group, out, in]` is wrapped in one `ShardedTensorFactory` whose `data` *is* the Parameter:
Megatron's optimizers find a parameter's checkpoint metadata by identity (`id(sharded.data)`,
dist_checkpointing/optimizer.py:67, distrib_optimizer.py:1460), so the optimizer state of a group (same shape) is split
into per-expert shards by the same factory. The factory's dict key is the group Parameter's name (as Megatron's own
GroupedMLP does with `weight1`), and `load_state_dict` accepts both that key and the per-expert keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

PROJECTIONS = ("fc1", "fc2")
TP_AXIS = {"fc1": 0, "fc2": 1}  # ColumnParallelLinear shards rows, RowParallelLinear columns (size 1 here)


def expert_sharded_entries(
    module,
    proj: str,
    local_idx: int,
    weight: torch.Tensor,
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict,
) -> dict:
    """SequentialMLP's sharded entries of one expert's linear_{proj}: {state-dict key: sharded weight, _extra_state}."""
    singleton_local_shards = metadata.get("singleton_local_shards", False)
    num_global_experts = module.ep_group.size() * module.num_local_experts
    global_idx = module.ep_group.rank() * module.num_local_experts + local_idx
    state_prefix = f"{prefix}local_experts.{local_idx}."
    if singleton_local_shards:
        sharded_prefix = f"{prefix}experts.{global_idx}."
        expert_offsets = sharded_offsets
    else:
        sharded_prefix = f"{prefix}experts."
        expert_offsets = (*sharded_offsets, (len(sharded_offsets), global_idx, num_global_experts))
    linear_prefix = f"{state_prefix}linear_{proj}."
    entries = make_sharded_tensors_for_checkpoint(
        {"weight": weight, "_extra_state": None},
        linear_prefix,
        {"weight": TP_AXIS[proj]},
        expert_offsets,
        tp_group=module.tp_group,
        dp_cp_group=metadata["dp_cp_group"],
    )
    if module.config.gated_linear_unit and proj == "fc1":
        key = f"{linear_prefix}weight"
        entries[key] = apply_swiglu_sharded_factory(entries[key], expert_offsets, singleton_local_shards)
    replace_prefix_for_sharding(entries, state_prefix, sharded_prefix)
    for entry in entries.values():  # replication along DP modulo EP, as SequentialMLP.sharded_state_dict
        entry.replica_id = (*entry.replica_id[:2], module.dp_group.rank())
    return entries


def _rekey(obj, old: str, new: str):
    """Prefix every sharded key with what the optimizer prepended to the factory key (e.g. `optimizer.state.exp_avg.`)."""
    # The factory key is authoritative: besides an optimizer prefix, the block may have replaced the stage-local
    # layer index with the global one (pipeline parallelism) after the factory captured `old`.
    if old == new:
        return obj
    if isinstance(obj, (list, tuple)):
        return [_rekey(o, old, new) for o in obj]
    if isinstance(obj, dict):
        return {k: _rekey(v, old, new) for k, v in obj.items()}
    assert obj.key == old, (obj.key, old, new)
    obj.key = new
    return obj


def group_factory(
    module,
    proj: str,
    param: torch.Tensor,
    local_ids: Sequence[int],
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict,
) -> ShardedTensorFactory:
    """One factory for a group Parameter [E_g, out, in]: builds each row's SequentialMLP shards, merges by stacking."""
    local_ids = list(local_ids)

    def weight_entry(t_row: torch.Tensor, local_idx: int):
        entries = expert_sharded_entries(module, proj, local_idx, t_row, prefix, sharded_offsets, metadata)
        entry = entries[f"{prefix}local_experts.{local_idx}.linear_{proj}.weight"]
        return entry.build() if isinstance(entry, ShardedTensorFactory) else entry

    template = weight_entry(param.detach()[0], local_ids[0])
    model_key = (template[0] if isinstance(template, list) else template).key

    @torch.no_grad()
    def build(key: str, t: torch.Tensor, replica_id, flattened_range):
        assert flattened_range is None, "flattened (distributed-optimizer fully_sharded_model_space) is not supported"
        return [_rekey(weight_entry(t[row], j), model_key, key) for row, j in enumerate(local_ids)]

    @torch.no_grad()
    def merge(loaded: list) -> torch.Tensor:
        rows = [torch.cat(x, dim=0) if isinstance(x, list) else x for x in loaded]
        return torch.stack(rows, dim=0)

    replica_id = (template[0] if isinstance(template, list) else template).replica_id
    return ShardedTensorFactory(model_key, param, build, merge, replica_id)


def extra_state_entries(module, proj: str, local_idx: int, weight_row, prefix: str, sharded_offsets, metadata) -> dict:
    """The `_extra_state` ShardedObject SequentialMLP writes for one expert linear (value None for local linears)."""
    entries = expert_sharded_entries(module, proj, local_idx, weight_row, prefix, sharded_offsets, metadata)
    key = f"{prefix}local_experts.{local_idx}.linear_{proj}._extra_state"
    return {key: entries[key]}


def load_state_dict(module, state_dict, prefix: str, strict: bool, missing_keys, unexpected_keys, error_msgs) -> None:
    """`module._load_from_state_dict`: its group keys (`{prefix}fc1_trainable`, ...: what a dist_checkpointing load
    returns) and SequentialMLP's per-expert keys, into the group Parameters."""
    consumed = set()

    def copy_into(target, key) -> bool:
        consumed.add(key)
        if tuple(state_dict[key].shape) != tuple(target.shape):
            error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)} vs {tuple(target.shape)}")
            return False
        target.copy_(state_dict[key])
        return True

    with torch.no_grad():
        for proj in PROJECTIONS:
            loaded_rows = set()
            for group in ("trainable", "frozen"):
                key = f"{prefix}{proj}_{group}"
                if key in state_dict and copy_into(getattr(module, f"{proj}_{group}"), key):
                    loaded_rows.update(module._group_ids[group])
            for j in range(module.num_local_experts):
                key = f"{prefix}local_experts.{j}.linear_{proj}.weight"
                consumed.add(f"{prefix}local_experts.{j}.linear_{proj}._extra_state")
                if key in state_dict:
                    copy_into(module.expert_weight(proj, j), key)
                elif j not in loaded_rows:
                    missing_keys.append(key)
    if strict:
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in consumed)
