"""Expert config -> frozen Megatron-Core model, and trainable-parameter accounting.

`apply_finetune_mode(model_chunks, mode, expert_config)` sets `requires_grad` on this rank's model chunks *before*
Megatron DDP and the optimizer are built (they only see `requires_grad` parameters: no grad buffer, no optimizer
state, no weight decay for frozen ones), following the official `esft.py::to_esft` exactly:

* everything is frozen unless `non_expert_modules` is true (then attention, norms, embeddings, output layer, dense
  MLPs and the routers' weights train);
* shared experts train iff `shared_experts` is true (even with `non_expert_modules`, as in the official code);
* routed experts train iff selected: ESFT layer key `k` is the layer with `layer_number == k + 1`; global expert `g`
  lives on EP rank `g // num_local` at local slot `g % num_local` (expert_config.expert_placement);
* V3's router expert bias is a buffer that Megatron updates from the token counts whatever `requires_grad` says;
  a frozen router therefore needs `moe_router_bias_update_rate == 0` (checked here).

`mode="full"` trains every parameter (the FFT baseline on the same code path).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_esft.parallel import all_reduce

from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import ExpertConfig, ModelShape, layer_number_to_layer_key

MODES = ("esft", "full")


def _chunks(model_chunks) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def decoder_layers(model_chunks):
    """(layer_number, TransformerLayer) of this rank's chunks; layer_number is 1-based and global."""
    for chunk in _chunks(model_chunks):
        for layer in _unwrap(chunk).decoder.layers:
            yield layer.layer_number, layer


def is_moe_layer(layer) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(getattr(layer, "mlp", None), MoELayer)


def _ep_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank()


def _set_local_experts(experts, local_ids: list[int]) -> None:
    """Make exactly `local_ids` of a layer's local experts trainable (SequentialMLP or the frozen-aware experts)."""
    if hasattr(experts, "set_trainable_experts"):
        experts.set_trainable_experts(local_ids)
        return
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is None:
        raise UserError(f"{type(experts).__name__}: per-expert freezing is not supported (use --experts-impl "
                        "grouped or sequential)")
    for j, expert in enumerate(local_experts):
        for p in expert.parameters():
            p.requires_grad_(j in local_ids)


def validate_for_training(ecfg: ExpertConfig, shape: ModelShape, source: str) -> None:
    """The official-format checks plus the training-specific one: an expert config must select something."""
    ecfg.validate(shape, source=source)
    if ecfg.num_selected() == 0 and not ecfg.shared_experts and not ecfg.non_expert_modules:
        raise UserError(f"{source}: the expert config selects no expert in any layer (nothing to train)")


def first_trainable_layer_number(ecfg: ExpertConfig | None, mode: str, moe_layer_keys) -> int | None:
    """The global layer_number of the first layer with anything trainable in it (None: the embedding trains)."""
    if mode == "full" or ecfg is None or ecfg.non_expert_modules:
        return None
    keys = [int(k) for k, ids in ecfg.experts.items() if ids]
    if ecfg.shared_experts:
        keys += [int(k) for k in moe_layer_keys]
    return min(keys) + 1 if keys else None


def apply_finetune_mode(model_chunks, mode: str, ecfg: ExpertConfig | None) -> None:
    if mode not in MODES:
        raise UserError(f"--finetune-mode {mode!r}: choose from {', '.join(MODES)}")
    chunks = [_unwrap(c) for c in _chunks(model_chunks)]
    train_rest = mode == "full" or ecfg.non_expert_modules
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(train_rest)
    ep_rank = _ep_rank()
    for layer_number, layer in decoder_layers(chunks):
        if not is_moe_layer(layer):
            continue
        mlp = layer.mlp
        num_local = mlp.num_local_experts
        if mode == "full":
            local = list(range(num_local))
        else:
            local = ecfg.local_selected(layer_number, ep_rank, num_local)
        _set_local_experts(mlp.experts, local)
        if mlp.shared_experts is not None:
            for p in mlp.shared_experts.parameters():
                p.requires_grad_(mode == "full" or ecfg.shared_experts)
        router = mlp.router
        router_trains = mode == "full" or ecfg.non_expert_modules
        for p in router.parameters():
            p.requires_grad_(router_trains)
        rate = getattr(router.config, "moe_router_bias_update_rate", 0.0) or 0.0
        if getattr(router, "expert_bias", None) is not None and rate > 0 and not router_trains:
            raise UserError(f"--moe-router-bias-update-rate {rate}: the router of layer "
                            f"{layer_number_to_layer_key(layer_number)} is frozen, but its expert bias would still move;"
                            " use 0 with ESFT (or non_expert_modules=true)")


# ------------------------------------------------------------------------------------------------ accounting


@dataclasses.dataclass
class TrainableReport:
    per_layer: dict[str, int]  # HF layer key -> trainable parameters of that decoder layer (all ranks)
    other: int  # embeddings, final norm, output layer
    routed_experts: int  # trainable routed-expert parameters (all layers, all ranks)
    total: int
    total_params: int  # every parameter of the model

    def lines(self) -> list[str]:
        out = [f"trainable parameters: {self.total:,} of {self.total_params:,} "
               f"({100.0 * self.total / max(self.total_params, 1):.2f}%), routed experts {self.routed_experts:,}"]
        for key in sorted(self.per_layer, key=int):
            out.append(f"  layer {key}: {self.per_layer[key]:,}")
        if self.other:
            out.append(f"  embeddings/final norm/output: {self.other:,}")
        return out


def _replication(param, is_expert: bool) -> int:
    """How many ranks hold an identical copy of this rank's piece of `param` (so global sums count it once)."""
    from megatron.core import parallel_state as ps

    if is_expert:  # expert tensor parallelism is 1 (models/provider.py): replicated over the expert-DP group
        return ps.get_expert_data_parallel_world_size()
    replicas = ps.get_data_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False):
        replicas *= ps.get_tensor_model_parallel_world_size()
    return replicas


def count_trainable(model_chunks, num_layers: int) -> TrainableReport:
    """Global trainable-parameter counts (a collective over the world)."""
    chunks = [_unwrap(c) for c in _chunks(model_chunks)]
    # slots: [layer 0 .. num_layers-1 trainable, other trainable, routed-expert trainable, all params]
    acc = torch.zeros(num_layers + 3, dtype=torch.float64)
    seen = set()
    for chunk in chunks:
        layer_of = {}
        for layer_number, layer in decoder_layers([chunk]):
            for p in layer.parameters():
                layer_of[id(p)] = layer_number - 1
        for name, p in chunk.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_expert = ".experts." in name and ".shared_experts." not in name
            share = p.numel() / _replication(p, is_expert)
            acc[-1] += share
            if not p.requires_grad:
                continue
            idx = layer_of.get(id(p))
            acc[num_layers if idx is None else idx] += share
            if is_expert:
                acc[num_layers + 1] += share
    if dist.is_initialized():
        all_reduce(acc)
    acc = [int(round(float(x))) for x in acc]
    per_layer = {str(i): acc[i] for i in range(num_layers)}
    return TrainableReport(per_layer=per_layer, other=acc[num_layers], routed_experts=acc[num_layers + 1],
                           total=sum(acc[: num_layers + 1]), total_params=acc[-1])
