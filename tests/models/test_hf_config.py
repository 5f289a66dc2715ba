import json

import pytest

from megatron_esft.errors import UserError
from megatron_esft.models.hf_config import load_hf_config, parse_hf_config
from megatron_esft.models.tiny import TinySpec, hf_config_dict


@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v3", "deepseek-moe"])
def test_tiny_configs_parse(arch):
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch=arch)))
    assert cfg.arch == arch
    assert cfg.moe_layers == [1, 2]  # first layer dense, the rest MoE
    assert cfg.multi_latent_attention == (arch != "deepseek-moe")
    assert cfg.score_function == ("sigmoid" if arch == "deepseek-v3" else "softmax")


def test_v2_lite_shape_numbers():
    raw = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_routed_experts": 64,
           "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512,
           "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}
    cfg = parse_hf_config(raw)
    assert len(cfg.moe_layers) == 26 and cfg.params_per_expert == 8_650_752
    assert cfg.rope_scaling["factor"] == 40.0 and cfg.q_lora_rank is None


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported architecture"),
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"n_routed_experts": 0}, "positive integer"),
    ({"num_experts_per_tok": 99}, "exceeds"),
    ({"topk_method": "noaux_tc"}, "not supported"),
    ({"rope_parameters": {"rope_type": "llama3"}}, "rope type"),
])
def test_bad_configs_name_the_field(change, message):
    raw = dict(hf_config_dict(TinySpec(arch="deepseek-v2")), **change)
    with pytest.raises(UserError, match=message):
        parse_hf_config(raw)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v2",\n  oops}')
    with pytest.raises(UserError, match=r"config.json:2: not valid JSON"):
        load_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="expected a JSON object"):
        load_hf_config(str(tmp_path))
