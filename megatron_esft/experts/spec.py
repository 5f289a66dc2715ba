"""Put the frozen-aware experts into Megatron-Core layer / block specs (in place of SequentialMLP)."""

from __future__ import annotations

import copy

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec


def _experts_class(backend: str):
    if backend == "torch":
        from megatron_esft.experts.grouped import FrozenAwareGroupedExperts

        return FrozenAwareGroupedExperts
    if backend == "te":
        # Planned: two TE GroupedLinear per projection (trainable / frozen), since TE decides wgrad for all GEMMs
        # of one module from weights[0].requires_grad. Not written yet (needs a GPU with TE to prove it).
        raise NotImplementedError("the Transformer Engine experts backend is not implemented yet; use 'torch'")
    raise ValueError(f"unknown experts backend {backend!r} (torch, te)")


def _swap_in_layer(layer_spec: ModuleSpec, experts_cls) -> bool:
    mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
    if not isinstance(mlp, ModuleSpec) or not (isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)):
        return False
    experts = mlp.submodules.experts
    submodules = experts.submodules if isinstance(experts, ModuleSpec) else None
    mlp.submodules.experts = ModuleSpec(module=experts_cls, submodules=submodules)
    return True


def use_grouped_experts(spec, backend: str = "torch"):
    """Return a copy of a layer spec (ModuleSpec) or block spec (TransformerBlockSubmodules) whose MoE layers use the
    frozen-aware grouped experts. Dense layers are untouched. `backend`: "torch" (torch._grouped_mm, CPU and GPU);
    "te" (Transformer Engine GroupedLinear) is reserved and not implemented yet."""
    experts_cls = _experts_class(backend)
    spec = copy.deepcopy(spec)
    layer_specs = getattr(spec, "layer_specs", None)
    swapped = sum(_swap_in_layer(s, experts_cls) for s in layer_specs) if layer_specs is not None else int(
        _swap_in_layer(spec, experts_cls)
    )
    if not swapped:
        raise ValueError("use_grouped_experts: the spec has no MoE layer")
    return spec


def set_expert_gemm_backend(model_chunks, backend: str = "bf16", fp8_weight_cache: str = "frozen") -> int:
    """Select the GEMM backend ("bf16" or "fp8", see experts/fp8.py) of every frozen-aware experts module in a model
    (or list of model chunks, DDP-wrapped or not); returns how many modules were switched. Call after freezing
    (`set_trainable_experts` replaces the Parameters and clears the FP8 weight cache)."""
    from megatron_esft.experts.grouped import FrozenAwareGroupedExperts

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    switched = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FrozenAwareGroupedExperts):
                module.set_gemm_backend(backend, fp8_weight_cache)
                switched += 1
    return switched
