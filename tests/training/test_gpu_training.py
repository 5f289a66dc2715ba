"""GPU-only (skipped on CPU): the trainer with bf16 parameters and FP8 experts, the frozen experts' weights kept in host
memory (--offload-frozen-experts) or on the device, the FP8 GEMMs in torch's kernel or the Triton one
(--expert-fp8-gemm-kernel triton, with the hand-written quantizers: --expert-fp8-quantizer triton). Frozen experts
stay bit-identical to the base checkpoint; losses and trained experts agree with the resident run (the trainer
offloads after loading the base checkpoint, as after a resume). Two GPU runs are compared with a tolerance, not bit
for bit: the SDPA attention backward may accumulate with atomics."""

import re

import pytest
import torch

from training_helpers import load_mcore, losses, pretrain
from megatron_esft.experts.fp8 import scaled_grouped_mm_supported

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and scaled_grouped_mm_supported(torch.device("cuda"))),
    reason="FP8 experts need an sm90/sm100 GPU (torch._scaled_grouped_mm)")

FP8 = ["--bf16", "--expert-gemm", "fp8", "--train-iters", "4", "--save-interval", "2"]
ROUTED = "decoder.layers.{}.mlp.experts.experts.linear_fc{}.weight"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_close_runs(got_losses, want_losses, got, want):
    assert len(got_losses) == len(want_losses) == 4
    for a, b in zip(got_losses, want_losses):
        assert abs(a - b) <= 1e-3 * abs(b), (got_losses, want_losses)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert _rel(got[key], value) < 1e-2, key


@pytest.mark.timeout(500)  # three trainer processes
def test_offloaded_frozen_experts_and_the_triton_gemms_train_like_resident_ones(training_env, tmp_path):
    env = training_env
    runs = {}
    for name, extra in (("resident", []), ("offloaded", ["--offload-frozen-experts"]),
                        ("triton", ["--expert-fp8-gemm-kernel", "triton", "--expert-fp8-quantizer", "triton"])):
        save = str(tmp_path / name)
        proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *FP8, *extra, data=env["data"])
        runs[name] = (save, proc, load_mcore(save, 4))
    out = runs["offloaded"][1].stdout
    assert "frozen expert weights moved to host memory" in out
    assert len(re.findall(r"^\[Rank 0\] \(after 1 iterations\) memory \(MB\) \| allocated: ", out, re.M)) == 1
    _assert_close_runs(losses(runs["offloaded"][1]), losses(runs["resident"][1]), runs["offloaded"][2],
                       runs["resident"][2])
    # the Triton FP8 GEMMs and quantizers (experts/fp8_triton_gemm.py, fp8_triton_quantize.py) against torch's
    # kernels and the compiled quantizers: the same e4m3 math, other rounding ties
    _assert_close_runs(losses(runs["triton"][1]), losses(runs["resident"][1]), runs["triton"][2], runs["resident"][2])
    # the autotuned candidates, named once after the first logged iteration (to pin with --expert-fp8-gemm-config)
    out = runs["triton"][1].stdout
    tuned = re.findall(r"^Triton FP8 GEMM autotuned \(N, K, rows per group\): (.*) \(pin one with", out, re.M)
    assert len(tuned) == 1 and re.search(r"(pointer|TMA) \d+x\d+x\d+ w\d s\d", tuned[0]), out[-3000:]
    base, offloaded = load_mcore(env["base"], 0), runs["offloaded"][2]
    for proj in (1, 2):  # layer 3 trains no expert, layer 2 only expert 5 (training_helpers.ECFG)
        key = ROUTED.format(3, proj)
        assert torch.equal(base[key].to(offloaded[key].dtype), offloaded[key]), key
        key = ROUTED.format(2, proj)
        frozen = [e for e in range(8) if e != 5]
        assert torch.equal(base[key][frozen].to(offloaded[key].dtype), offloaded[key][frozen]), key
        assert not torch.equal(base[key][5].to(offloaded[key].dtype), offloaded[key][5]), key
