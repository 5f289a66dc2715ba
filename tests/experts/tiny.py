"""Tiny Megatron-Core MoE GPT models for the experts tests: SequentialMLP reference vs frozen-aware grouped experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tiny_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_layer_freq=[0, 1], moe_grouped_gemm=False, use_cpu_initialization=True, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        params_dtype=torch.float32, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(config, grouped: bool, vocab: int = 64, seq: int = 16, gather_permutation: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_esft.experts import use_grouped_experts
    from megatron_esft.experts.spec import use_gather_permutation

    # Megatron's aux-loss tracker is process-global and sized by the first model's num_layers: reset it, so models
    # with more layers can be built later in the same pytest process.
    get_moe_layer_wise_logging_tracker().clear()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    if grouped:
        spec = use_grouped_experts(spec)
    if gather_permutation:  # otherwise Megatron-Core's own MoELayer, dispatcher and permutation (the reference)
        spec = use_gather_permutation(spec)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
                    position_embedding_type="rope")


def moe_experts(model):
    """[(layer_number, experts module)] for every MoE layer."""
    return [(layer.layer_number, layer.mlp.experts) for layer in model.decoder.layers if hasattr(layer.mlp, "experts")]


def copy_sequential_to_grouped(seq_model, grouped_model):
    """Load the reference weights into the grouped model through its state_dict (per-expert SequentialMLP names)."""
    missing, unexpected = grouped_model.load_state_dict(seq_model.state_dict(), strict=True)
    assert not missing and not unexpected, (missing, unexpected)


def freeze_sequential(model, trainable: dict):
    """Reference freezing: requires_grad_(False) on every non-selected SequentialMLP expert."""
    for layer_number, experts in moe_experts(model):
        for j, expert in enumerate(experts.local_experts):
            expert.requires_grad_(j in trainable.get(layer_number, ()))


def freeze_grouped(model, trainable: dict):
    for layer_number, experts in moe_experts(model):
        experts.set_trainable_experts(trainable.get(layer_number, ()))


def batch(seed: int = 0, b: int = 2, s: int = 16, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    return tokens, position_ids, labels


def loss_of(model, data):
    tokens, position_ids, labels = data
    return model(tokens, position_ids, None, labels=labels).float().mean()


def expert_grads(model) -> dict:
    """{(layer, local expert, proj): grad or None} in the per-expert layout, for either experts implementation."""
    out = {}
    for layer_number, experts in moe_experts(model):
        for j in range(experts.num_local_experts):
            for proj in ("fc1", "fc2"):
                if hasattr(experts, "local_experts"):
                    weight = getattr(experts.local_experts[j], f"linear_{proj}").weight
                    out[(layer_number, j, proj)] = None if weight.grad is None else weight.grad.clone()
                else:
                    group, row = experts.placement(j)
                    param = getattr(experts, f"{proj}_{group}")
                    out[(layer_number, j, proj)] = None if param.grad is None else param.grad[row].clone()
    return out
