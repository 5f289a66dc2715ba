"""GPU-only (skipped on CPU): the trainer with bf16 parameters and FP8 experts, the frozen experts' weights kept in host
memory (--offload-frozen-experts) or on the device: the same losses and checkpoints bit for bit, frozen experts
unchanged, and the resumed run (which loads the checkpoint before offloading) lands on the straight run's weights."""

import pytest
import torch

from conftest import load_mcore, losses, pretrain

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() in ((9, 0), (10, 0))),
    reason="FP8 experts need an sm90/sm100 GPU (torch._scaled_grouped_mm)")

FP8 = ["--bf16", "--expert-gemm", "fp8", "--train-iters", "4", "--save-interval", "2"]


def test_offloaded_frozen_experts_train_like_resident_ones(training_env, tmp_path):
    env = training_env
    runs = {}
    for name, extra in (("resident", []), ("offloaded", ["--offload-frozen-experts"])):
        save = str(tmp_path / name)
        proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *FP8, *extra, data=env["data"])
        runs[name] = (save, proc)
    assert "frozen expert weights moved to host memory" in runs["offloaded"][1].stdout
    assert losses(runs["resident"][1]) == losses(runs["offloaded"][1])
    resident, offloaded = load_mcore(runs["resident"][0], 4), load_mcore(runs["offloaded"][0], 4)
    assert resident.keys() == offloaded.keys()
    for key, value in resident.items():
        assert torch.equal(value, offloaded[key]), key
    base = load_mcore(env["base"], 0)
    frozen_expert = "decoder.layers.3.mlp.experts.experts.linear_fc1.weight"  # layer 3 trains no expert
    assert torch.equal(base[frozen_expert].to(offloaded[frozen_expert].dtype), offloaded[frozen_expert])
    # 2 iterations + a resume for 2 (the resume loads the checkpoint into device weights, then offloads)
    resumed = str(tmp_path / "resumed")
    first = pretrain(env["base"], resumed, "--expert-config", env["ecfg"], *FP8, "--exit-interval", "2",
                     "--offload-frozen-experts", data=env["data"])
    second = pretrain(resumed, resumed, *FP8, "--offload-frozen-experts", data=env["data"])
    assert "resumed from" in second.stdout
    assert losses(first) + losses(second) == losses(runs["offloaded"][1])
    for key, value in load_mcore(resumed, 4).items():
        assert torch.equal(value, offloaded[key]), key
