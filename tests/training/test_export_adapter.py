"""The ESFT adapter: official layout (expert_cfg.json + only the trained experts, HF names), and base + adapter ==
the merged HF export of the same checkpoint, bit for bit."""

import json
import os

import pytest
import torch

from training_helpers import ECFG, load_hf, run, selected_name


def test_adapter_round_trip(training_env, reference):
    adapter = str(training_env["root"] / "adapter")
    merged = str(training_env["root"] / "merged")
    proc = run(["tools/export_esft.py", "--load", reference["save"], "--out", adapter,
                "--merge-into-hf", training_env["hf"], "--merged-out", merged])
    assert "9 tensors" in proc.stdout
    assert sorted(os.listdir(adapter)) == ["expert_cfg.json", "model.safetensors"]
    with open(os.path.join(adapter, "expert_cfg.json")) as fh:
        assert json.load(fh) == ECFG
    weights = load_hf(adapter)
    assert sorted(weights) == sorted(n for n in reference["hf6"] if selected_name(n))
    merged_w = load_hf(merged)
    assert set(merged_w) == set(reference["hf6"])
    for name, tensor in reference["hf6"].items():
        assert merged_w[name].dtype == tensor.dtype and torch.equal(merged_w[name], tensor), name


def test_export_of_a_base_checkpoint_is_a_user_error(training_env):
    from megatron_esft.checkpoint.adapter import export_adapter
    from megatron_esft.errors import UserError

    out = str(training_env["root"] / "no-adapter")
    with pytest.raises(UserError, match="is not an ESFT training checkpoint"):
        export_adapter(training_env["base"], out)
    assert not os.path.exists(out)


def test_the_merged_export_differs_from_the_base_in_the_selected_experts_only(training_env, reference):
    """tools/diff_checkpoints.py on the reference run's HF export against its base: exactly the expert config's
    experts changed (all three: each got tokens), which the tool confirms against the config."""
    from training_helpers import SELECTED

    proc = run(["tools/diff_checkpoints.py", "--base", training_env["hf"], "--other", reference["hf6_dir"],
                "--expert-config", training_env["ecfg"], "--json"])
    data = json.loads(proc.stdout)
    assert data["matches_expert_config"] is True and data["changed_other"] == []
    assert {(int(layer), e) for layer, experts in data["changed_experts"].items() for e in experts} == SELECTED
