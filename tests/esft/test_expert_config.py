"""Expert-config format: official file round trip, validation against a model, Megatron-Core key mapping."""

import json
from pathlib import Path

import pytest

from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import (
    ExpertConfig,
    ModelShape,
    expert_placement,
    global_expert_id,
    layer_key_to_layer_number,
    layer_number_to_layer_key,
    load_expert_config,
    save_expert_config,
)

INTENT_CONFIG = (Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "esft_official"
                 / "expert_configs" / "intent.json")
V2_LITE = ModelShape.from_hf_dict({"num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                                   "n_routed_experts": 64, "num_experts_per_tok": 6, "hidden_size": 2048,
                                   "moe_intermediate_size": 1408}, source="v2-lite")


def test_model_shape_from_hf_config(tmp_path):
    assert V2_LITE.moe_layer_keys == tuple(str(i) for i in range(1, 27))
    assert V2_LITE.params_per_expert == 8_650_752 and V2_LITE.topk == 6  # paper: 3 x 2048 x 1408
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 6, "first_k_dense_replace": 1,
                                                      "moe_layer_freq": 2, "n_routed_experts": 8}))
    shape = ModelShape.from_hf_config(tmp_path)
    assert shape.moe_layer_keys == ("2", "4") and shape.num_experts == 8
    with pytest.raises(UserError, match="n_routed_experts"):
        ModelShape.from_hf_dict({"num_hidden_layers": 2})


@pytest.mark.skipif(not INTENT_CONFIG.is_file(), reason="official fixtures absent")
def test_official_config_round_trips_byte_identical(tmp_path):
    cfg = load_expert_config(INTENT_CONFIG, V2_LITE)
    assert cfg.num_selected() == 124 and cfg.selected("1") == [8, 26, 55, 6, 20]
    assert cfg.shared_experts is False and cfg.non_expert_modules is False
    out = tmp_path / "sub" / "cfg.json"
    save_expert_config(cfg, out, V2_LITE)
    assert out.read_bytes() == INTENT_CONFIG.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["cfg.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "experts, message",
    [
        ({str(i): [0] for i in range(1, 26)}, "missing MoE layer(s) 26"),
        ({**{str(i): [0] for i in range(1, 27)}, "0": [1]}, "layer(s) 0 are not MoE layers"),
        ({**{str(i): [0] for i in range(1, 27)}, "5": [64]}, "layer 5: expert id(s) [64] outside 0..63"),
    ],
)
def test_validation_against_model(tmp_path, experts, message):
    out = tmp_path / "cfg.json"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        save_expert_config(ExpertConfig(experts), out, V2_LITE)
    assert not out.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"experts": {"1": [1, 1]}}', "duplicate expert ids"),
        ('{"experts": {"01": [1]}}', "not a decoder-layer index"),
        ('{"experts": {"1": [1.5]}}', "integer expert ids"),
        ('{"experts": {"1": [1]}, "shared_experts": "yes"}', "must be true or false"),
        ('{"experts": {"1": [1]}, "train_router": true}', "unknown field"),
        ('[1, 2]', "\"experts\" object"),
        ('{"experts": ', "not valid JSON"),
    ],
)
def test_malformed_files(tmp_path, payload, message):
    path = tmp_path / "cfg.json"
    path.write_text(payload)
    with pytest.raises(UserError, match=message):
        load_expert_config(path)


def test_megatron_core_mapping():
    assert layer_key_to_layer_number("0") == 1 and layer_key_to_layer_number(26) == 27
    assert all(layer_number_to_layer_key(layer_key_to_layer_number(str(k))) == str(k) for k in range(30))
    for ep in (1, 2, 4, 8, 64):
        num_local = 64 // ep
        seen = set()
        for g in range(64):
            rank, slot = expert_placement(g, 64, ep)
            assert 0 <= rank < ep and 0 <= slot < num_local
            assert global_expert_id(rank, slot, num_local) == g
            seen.add((rank, slot))
        assert len(seen) == 64
    assert expert_placement(37, 64, 4) == (2, 5)  # contiguous blocks of 16, not round-robin
    cfg = ExpertConfig({"1": [8, 26, 55, 6, 20], "2": []})
    assert cfg.local_selected(layer_number=2, ep_rank=0, num_local=16) == [6, 8]
    assert cfg.local_selected(layer_number=2, ep_rank=1, num_local=16) == [4, 10]  # global 20, 26
    assert cfg.local_selected(layer_number=2, ep_rank=3, num_local=16) == [7]  # global 55
    assert cfg.local_selected(layer_number=3, ep_rank=0, num_local=16) == []
    with pytest.raises(ValueError):
        expert_placement(3, 10, 4)
