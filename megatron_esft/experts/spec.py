"""Put the frozen-aware experts into Megatron-Core layer / block specs (in place of SequentialMLP)."""

from __future__ import annotations

import copy

import torch

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


def _moe_mlp_specs(spec):
    """The MLP ModuleSpecs of the MoE layers in a layer spec (ModuleSpec) or block spec (TransformerBlockSubmodules)."""
    layer_specs = getattr(spec, "layer_specs", None)
    for layer_spec in layer_specs if layer_specs is not None else [spec]:
        mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
        if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer):
            yield mlp


def use_grouped_experts(spec, backend: str = "torch"):
    """Return a copy of a layer spec (ModuleSpec) or block spec (TransformerBlockSubmodules) whose MoE layers use the
    frozen-aware grouped experts. Dense layers are untouched (a pipeline stage's block may hold dense layers only, e.g.
    the first stage of an uneven split). `backend`: "torch" (torch._grouped_mm, CPU and GPU); "te" (Transformer
    Engine GroupedLinear) is reserved and not implemented yet."""
    experts_cls = _experts_class(backend)
    spec = copy.deepcopy(spec)
    mlps = list(_moe_mlp_specs(spec))
    if not mlps and getattr(spec, "layer_specs", None) is None:
        raise ValueError("use_grouped_experts: the layer spec is not a MoE layer")
    for mlp in mlps:
        experts = mlp.submodules.experts
        submodules = experts.submodules if isinstance(experts, ModuleSpec) else None
        mlp.submodules.experts = ModuleSpec(module=experts_cls, submodules=submodules)
    return spec


def use_gather_permutation(spec):
    """Return a copy of a layer or block spec whose MoE layers dispatch tokens with the atomic-free, sync-free
    permutation of experts/permutation.py (Megatron's own is still one `set_moe_permutation` call away)."""
    from megatron_esft.experts.permutation import GatherPermutationMoELayer

    spec = copy.deepcopy(spec)
    for mlp in _moe_mlp_specs(spec):
        if mlp.module is MoELayer:
            mlp.module = GatherPermutationMoELayer
    return spec


def set_expert_gemm_backend(model_chunks, backend: str = "bf16", fp8_weight_cache: str = "frozen") -> int:
    """Select the GEMM backend ("bf16" or "fp8", see experts/fp8.py) of every frozen-aware experts module in a model
    (or list of model chunks, DDP-wrapped or not); returns how many modules were switched. Call after freezing
    (`set_trainable_experts` replaces the Parameters and clears the FP8 weight cache)."""
    switched = 0
    for module in _grouped_experts_modules(model_chunks):
        module.set_gemm_backend(backend, fp8_weight_cache)
        switched += 1
    return switched


def set_expert_token_counts(model_chunks, mode: str = "host") -> int:
    """Where every frozen-aware experts module takes its token counts: "host" (default) or "device" (no host sync
    where the experts can do without: one rank for all experts, bf16; experts/device_counts.py); returns how many
    modules were set."""
    switched = 0
    for module in _grouped_experts_modules(model_chunks):
        module.set_token_counts(mode)
        switched += 1
    return switched


def device_counts_copy_bytes(model_chunks) -> int:
    """GPU memory the device token counts cost: a second copy of the trained experts' weights in every module that
    keeps its counts on the device (bf16: experts/device_counts.py; FP8: their e4m3 quantizations in both layouts,
    experts/fp8_device_counts.py, 2 bytes per parameter; the decode scales not counted)."""
    return sum(p.numel() * (2 if module.gemm_backend == "fp8" else p.element_size())
               for module in _grouped_experts_modules(model_chunks)
               if module.counts_on_device() for p in (module.fc1_trainable, module.fc2_trainable))


def offload_frozen_expert_weights(model_chunks) -> tuple[int, int]:
    """Move the frozen experts' weights of every frozen-aware experts module to host memory, keeping their FP8
    quantizations on the device (`FrozenAwareGroupedExperts.offload_frozen_weights`; needs the fp8 backend with a
    weight cache). Returns (bytes moved to host memory, bytes of the FP8 weight caches on the device)."""
    moved = cached = 0
    for module in _grouped_experts_modules(model_chunks):
        moved += module.offload_frozen_weights()
        cached += module._fp8_cache.nbytes()
    return moved, cached


def note_expert_weights_updated(model_chunks) -> int:
    """Tell the FP8 weight caches that the trainable experts' weights changed (call after every optimizer step).

    The caches notice in-place updates through a Parameter by its autograd version. Megatron-Core's
    DistributedOptimizer instead writes the new bf16 weights into DDP's parameter buffer, of which the Parameters are
    views, and that leaves their version unchanged: a `fp8_weight_cache="all"` cache would keep quantizing the first
    step's weights. This bumps the version of every trainable expert Parameter (nothing is copied; with
    `--overlap-param-gather` the cache is re-made at the next forward, after DDP's pre-hook waited for the gather).
    Returns how many Parameters were marked."""
    marked = 0
    for module in _grouped_experts_modules(model_chunks):
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                torch.autograd.graph.increment_version(param)
                marked += 1
    return marked


def experts_with_host_counts(model_chunks) -> list[str]:
    """Names of the frozen-aware experts modules whose next forward copies its token counts to the host: all of them
    in the "host" mode; in the "device" mode those that cannot do without (`counts_on_device`: e.g. FP8 experts
    without a weight cache, or no grouped GEMM kernel for their shapes on this device)."""
    return [name for name, module in _named_grouped_experts_modules(model_chunks) if not module.counts_on_device()]


def _named_grouped_experts_modules(model_chunks):
    from megatron_esft.experts.grouped import FrozenAwareGroupedExperts

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, FrozenAwareGroupedExperts):
                yield name, module


def _grouped_experts_modules(model_chunks):
    return (module for _, module in _named_grouped_experts_modules(model_chunks))
