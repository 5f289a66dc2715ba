"""Fused kernels a model may use without Transformer Engine, and when each can be used.

Without TE the local layer spec runs RoPE and SwiGLU as chains of small elementwise kernels (on an H100 about half
of an ESFT step's GPU time was such memory-bound work, docs/gpu.md). Megatron-Core ships two fusions that need no TE
(switched by TransformerConfig fields, `config_fields`); the third is ours (a core-attention class, chosen by
`provider.block_spec`):

| name | what runs | needs |
|---|---|---|
| `swiglu` | `megatron.core.fusions.fused_bias_swiglu` (`bias_activation_fusion=True`): SwiGLU forward and backward as one `torch.compile`d kernel each, in the dense MLPs, the shared experts, and — weighted by the router probabilities — the routed experts (SequentialMLP's `weighted_bias_swiglu_impl`; the frozen-aware grouped experts call the same function) | `torch.compile` (Triton on CUDA, a C++ compiler on CPU) |
| `rope` | `megatron.core.fusions.fused_mla_yarn_rope_apply` (`apply_rope_fusion=True`): MLA's YaRN RoPE plus the q / k concatenations as one Triton kernel each way | multi-latent attention with YaRN RoPE, Triton; training forward only (Megatron asserts no inference context) |
| `linear_cross_entropy` | `models.gpt.ESFTGPTModel` + `models.linear_cross_entropy`: the output layer's GEMM and the cross-entropy loss chunk by chunk of tokens, the logit gradient computed in forward (one `torch.compile`d kernel per chunk on CUDA), no full-vocabulary fp32 tensor; where it does not apply, GPTModel's own loss | a frozen output layer (ESFT), tensor-parallel size 1, no multi-token prediction |
| `flex_attention` | `models.attention.TorchFlexCoreAttention`: packed-document (masked) attention through torch FlexAttention with a block mask, skipping fully masked blocks (SDPA computes all seq^2 pairs and masks them) | the local spec (no TE); opt-in, not part of "auto" until measured on a GPU; on CPU only without gradients (FlexAttention has no CPU backward: SDPA is used there) |

Each changes only the rounding of intermediate values (one fp32 pass instead of several bf16 roundings); the tests
compare fused against unfused models. Names and switches follow Megatron-LM (`--no-bias-swiglu-fusion`,
`--no-rope-fusion`; `--no-linear-cross-entropy-fusion` and `--flex-attention` are ours). "auto" = `swiglu`, `rope`
and `linear_cross_entropy` where available, which is none on a
machine without CUDA (CPU runs stay on the exact eager path; the tests request fusions explicitly).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

FUSIONS = ("swiglu", "rope", "linear_cross_entropy", "flex_attention")
AUTO = ("swiglu", "rope", "linear_cross_entropy")  # what "auto" may pick (flex_attention: opt-in until measured)
CONFIG_FIELDS = {"swiglu": "bias_activation_fusion", "rope": "apply_rope_fusion"}  # Megatron's switches


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from megatron.core.fusions import fused_mla_yarn_rope_apply

    return bool(fused_mla_yarn_rope_apply.HAVE_TRITON)


def unavailable_reason(name: str, cfg) -> str | None:
    """Why fusion `name` cannot be used for the model config `cfg` (a DeepSeekConfig) on this machine, or None."""
    if name not in FUSIONS:
        return f"unknown fusion {name!r} (choose from {', '.join(FUSIONS)})"
    if name == "rope":
        if not cfg.multi_latent_attention or not cfg.rope_scaling:
            return "the fused RoPE kernels are Megatron-Core's MLA YaRN kernels (this model has no MLA with YaRN)"
        if not _triton_available():
            return "Triton is not installed (or older than 3.4 on a machine without CUDA)"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (or Triton's interpreter on CPU: TRITON_INTERPRET=1, tests only)"
    return None


def resolve(requested: str | Iterable[str] | None, cfg) -> tuple[str, ...]:
    """The fusions to use: "auto" -> all available on CUDA (none on CPU); None / "none" -> none; or explicit names
    (an unavailable one raises ValueError with the reason)."""
    if requested is None or requested == "none":
        return ()
    if requested == "auto":
        if not torch.cuda.is_available():
            return ()
        return tuple(n for n in AUTO if unavailable_reason(n, cfg) is None)
    names = tuple(dict.fromkeys([requested] if isinstance(requested, str) else requested))
    for name in names:
        if (reason := unavailable_reason(name, cfg)) is not None:
            raise ValueError(f"fusion {name!r} unavailable: {reason}")
    return names


def config_fields(fusions: Iterable[str]) -> dict:
    """TransformerConfig fields for the resolved `fusions` (every field is set, so "no fusion" is explicit)."""
    fusions = set(fusions)
    return {field: name in fusions for name, field in CONFIG_FIELDS.items()}


def describe(model) -> str:
    """One log line: which fusions a built model uses (and, for MoE models, which token permutation)."""
    from megatron_esft.models.attention import TorchFlexCoreAttention

    on = [name for name, field in CONFIG_FIELDS.items() if getattr(model.config, field, False)]
    if getattr(model, "linear_cross_entropy", False) and model.post_process:
        # it applies to frozen output layers only (ESFT); call after freezing
        trains = model.output_weight().requires_grad
        on.append("linear_cross_entropy" + (" (off: output layer trains)" if trains else ""))
    if any(isinstance(m, TorchFlexCoreAttention) for m in model.modules()):
        on.append("flex_attention")
    line = "fused kernels: " + (", ".join(on) if on else "none (eager torch ops)")
    from megatron_esft.esft.freeze import decoder_layers, is_moe_layer

    moe = [layer.mlp for _, layer in decoder_layers(model) if is_moe_layer(layer)]
    if moe:  # MoE models: which token permutation (experts/permutation.py)
        dispatcher = moe[0].token_dispatcher
        permutation = dispatcher.effective_permutation() if hasattr(dispatcher, "effective_permutation") else "megatron"
        line += f"; MoE token permutation: {permutation}"
        counts = getattr(moe[0].experts, "counts_on_device", None)
        if permutation == "experts" and counts is not None and counts():
            line += " (token counts on the device: no host sync)"
    return line
