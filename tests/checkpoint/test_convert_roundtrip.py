"""HF -> Megatron-Core -> HF is bit-exact, and our model's logits match the reference implementation."""

import json
import os

import pytest

from megatron_esft.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_esft.models.parity import compare_logits
from megatron_esft.parallel import ParallelConfig
from tests.checkpoint.roundtrip_utils import assert_bit_exact

CASES = {
    "v2": ("deepseek-v2", {}),
    "v2-q-lora": ("deepseek-v2", {"q_lora_rank": 24}),
    # V2 group-limited routing scores a group by its max expert (Megatron's native rule is a top-2 sum) + YaRN rope
    "v2-group-limited-yarn": ("deepseek-v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 1,
                                              "yarn": True}),
    "v3": ("deepseek-v3", {}),
    "deepseek-moe": ("deepseek-moe", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_and_logit_parity(case, tiny_hf, tmp_path):
    arch, fields = CASES[case]
    hf = tiny_hf(arch, **fields)
    mcore = str(tmp_path / "mcore")
    hf_to_mcore(hf, mcore, ParallelConfig())
    result = compare_logits(hf, mcore, seq_length=24, batch=2)
    assert result["rel_l2"] < 1e-5, result
    back = str(tmp_path / "back")
    mcore_to_hf(mcore, back)
    assert_bit_exact(hf, back)
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf, "config.json")))
    assert os.path.exists(os.path.join(back, "tokenizer.json"))


def test_bf16_roundtrip_keeps_dtypes(tiny_hf, tmp_path):
    hf = tiny_hf("deepseek-v3", dtype="bfloat16")
    hf_to_mcore(hf, str(tmp_path / "mcore"), ParallelConfig())
    mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"))
    assert_bit_exact(hf, str(tmp_path / "back"))  # includes the fp32 e_score_correction_bias


def test_export_shards_and_index(tiny_hf, tmp_path):
    hf = tiny_hf("deepseek-v2")
    hf_to_mcore(hf, str(tmp_path / "mcore"), ParallelConfig())
    mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"), max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(tmp_path / "back"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert_bit_exact(hf, str(tmp_path / "back"))
