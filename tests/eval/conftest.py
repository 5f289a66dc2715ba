"""Tiny random transformers models (float64) shared by the generation and loss tests (helpers: eval_tiny_models)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, GPT2Config, GPT2LMHeadModel

from eval_tiny_models import PAD, VOCAB

# tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning threads cost a lot
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1234)
    config = DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
        initializer_range=0.5,  # large random weights: peaked, varied logits instead of a constant continuation
    )
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = DeepseekV2ForCausalLM(config).to(torch.float64).eval()
    return model


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Learned absolute positions: unlike RoPE (relative), this catches wrong position ids under left padding."""
    torch.manual_seed(4321)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=PAD, initializer_range=0.5)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).to(torch.float64).eval()
