"""A tiny Megatron-Core MoE GPTModel (built here, not through the model provider) for collector tests.

float64 everywhere (router logits included): a token's routing then agrees across parallel layouts to ~1e-15,
so 1-rank and 2-rank statistics can be compared to 1e-9 relative.
"""

import torch

VOCAB, SEQ, MICRO_BATCH, EXPERTS, TOPK, LAYERS = 128, 16, 2, 8, 2, 4


def build_tiny_moe(parallel, score_function="softmax", dtype=torch.float64):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_esft.models.attention import TorchSDPACoreAttention

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=16, moe_layer_freq=[0, 1, 1, 1],
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_router_pre_softmax=True, moe_router_score_function=score_function,
        moe_router_dtype="fp64" if dtype == torch.float64 else "fp32",
        moe_router_enable_expert_bias=score_function == "sigmoid", moe_router_bias_update_rate=0.0,
        moe_grouped_gemm=False, moe_permute_fusion=False, use_cpu_initialization=True, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel,
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = TorchSDPACoreAttention
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(), position_embedding_type="rope")
    return model.eval()


def micro_batches(n=6, seed=0):
    """Random tokens; trailing padding of random length in about half the sequences."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(1, VOCAB, (MICRO_BATCH, SEQ), generator=gen)
        valid = torch.ones(MICRO_BATCH, SEQ, dtype=torch.bool)
        for row in range(MICRO_BATCH):
            if torch.rand((), generator=gen) < 0.5:
                valid[row, int(torch.randint(1, SEQ, (), generator=gen)):] = False
        out.append({"tokens": tokens.masked_fill(~valid, 0), "valid": valid})
    return out
