"""training/weight_checks.py: the fingerprint against an independent integer computation, the frozen-weights check
on a module, and the trainer catching a weight changed behind the optimizer's back (a frozen one before a save; a
trained one on one data-parallel replica, Megatron-LM's --check-weight-hash-across-dp-replicas-interval)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from training_helpers import PY, REPO, TRAIN, losses, pretrain, run
from megatron_esft import parallel as par
from megatron_esft.errors import RunStopped, UserError
from megatron_esft.training import weight_checks
from megatron_esft.training.arguments import build_parser, validate

FAULT = REPO / "tests" / "training" / "weight_fault_main.py"


def _reference_fingerprint(tensor: torch.Tensor) -> int:
    """The documented formula in Python integers: sum(v_i * w_i) + sum(v_i ^ w_i) mod 2^64 (as a signed int64), v_i
    the elements' bit patterns as signed integers, w_i = i mod 1000003 + 1."""
    bits = weight_checks._as_integers(tensor).tolist()
    total = sum(v * (i % 1_000_003 + 1) + (v ^ (i % 1_000_003 + 1)) for i, v in enumerate(bits)) % 2**64
    return total - 2**64 if total >= 2**63 else total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                   torch.bool])
def test_fingerprint_is_the_documented_integer_function(dtype):
    gen = torch.Generator().manual_seed(0)
    tensor = (torch.randn(37, 11, generator=gen) * 1e3).to(dtype)
    assert weight_checks.fingerprints([tensor]).tolist() == [_reference_fingerprint(tensor)]


def test_fingerprint_does_not_depend_on_the_chunking_and_sees_every_element(monkeypatch):
    tensor = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = weight_checks.fingerprints([tensor])
    monkeypatch.setattr(weight_checks, "_CHUNK", 7)  # 429 chunks, the last one partial
    assert torch.equal(weight_checks.fingerprints([tensor]), whole)
    assert torch.equal(weight_checks.fingerprints([tensor.clone()]), whole)  # the bits, not the storage
    for index in (0, 6, 7, 1499, 2999):
        nudged = tensor.clone().view(-1)
        nudged.view(torch.int16)[index] += 1  # one ulp
        assert not torch.equal(nudged, tensor.view(-1))
        assert weight_checks.fingerprints([nudged]) != whole, index
    swapped = tensor.clone().view(-1)
    swapped[[10, 11]] = swapped[[11, 10]]
    assert weight_checks.fingerprints([swapped]) != whole  # positions count, not just the values


def test_fingerprint_of_no_tensors_and_of_an_unsupported_dtype():
    assert weight_checks.fingerprints([]).shape == (0,)
    with pytest.raises(TypeError, match="complex64"):
        weight_checks.fingerprints([torch.zeros(2, dtype=torch.complex64)])


@pytest.fixture(scope="module")
def process_group():
    par.init_process_group()  # one rank: the checks' all-reduce that stops every rank together
    yield


def _module():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    module[0].requires_grad_(False)  # frozen: 0.weight, 0.bias; trained: 1.weight, 1.bias
    return module


def test_frozen_check_names_the_changed_frozen_tensor_only(process_group):
    module = _module()
    check = weight_checks.FrozenWeightsCheck(module, interval=2)
    assert [check.due(i) for i in range(1, 5)] == [False, True, False, True]
    with torch.no_grad():
        module[1].weight.add_(1.0)  # trained: free to change
    check.check(1)
    check.check(1)  # once per iteration
    with torch.no_grad():
        module[0].bias[3] = torch.nextafter(module[0].bias[3], torch.tensor(9.0))
    with pytest.raises(RunStopped, match=r"^iteration 2: frozen weight 0\.bias changed since the start of training "
                                         r"\(rank 0\); .* so this is a bug$"):
        check.check(2)
    assert check.checks == 2
    assert check.summary() == ("frozen weights bit-identical to the start of training on every rank: checked 2 "
                               "times (rank 0: 2 tensors, 20 parameters)")


def test_frozen_check_turned_off_checks_nothing(process_group):
    module = _module()
    check = weight_checks.FrozenWeightsCheck(module, enabled=False, interval=0)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    check.check(1)
    assert not check.due(1) and check.summary() is None


@pytest.mark.parametrize("flags, message", [
    (["--check-frozen-weights-interval", "-1"], "--check-frozen-weights-interval -1: must be at least 0"),
    (["--check-frozen-weights-interval", "5", "--no-check-frozen-weights"], "contradict each other"),
    (["--check-weight-hash-across-dp-replicas-interval", "0"], "must be at least 1"),
])
def test_flag_errors(flags, message):
    args = build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "4", "--seq-length", "8",
                                      "--lr", "1e-3", *flags])
    with pytest.raises(UserError, match=message):
        validate(args, 1)


def test_trainer_checks_the_frozen_weights_and_trains_the_same(training_env, reference, tmp_path):
    """Every 2 iterations, before each save (3) and at the end: 4, 2-and-3 once each; the reference run's losses."""
    env = training_env
    proc = pretrain(env["base"], str(tmp_path / "out"), "--expert-config", env["ecfg"], "--train-iters", "4",
                    "--save-interval", "3", "--check-frozen-weights-interval", "2", data=env["data"])
    assert losses(proc) == reference["losses"][:4]
    assert "frozen weights bit-identical to the start of training on every rank: checked 3 times" in proc.stdout


def _error_lines(proc) -> list[str]:
    return re.findall(r"^error: .*$", proc.stderr, re.M)


def test_a_changed_frozen_weight_stops_the_run_before_the_save(training_env, tmp_path):
    """A frozen expert weight nudged after step 2: the check before the save of iteration 2 stops the run; the
    stop first publishes iteration 1's background save (--async-save), which the line names; 2 is never written."""
    env = training_env
    save = tmp_path / "out"
    proc = run([FAULT, "frozen", "2", "0", "--load", env["base"], "--save", save, "--train-data", env["data"],
                *TRAIN, "--expert-config", env["ecfg"], "--train-iters", "4", "--save-interval", "1", "--async-save",
                "--tensorboard-dir", tmp_path / "tb"], check=False)
    name = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAULT "))
    assert ".experts." in name and proc.returncode == 1, proc.stderr[-3000:]
    assert _error_lines(proc) == [
        f"error: iteration 2: frozen weight {name} changed since the start of training (rank 0); ESFT keeps every "
        "frozen weight bit-identical, so this is a bug; the checkpoint of iteration 2 was not written (last "
        f"checkpoint: iteration 1 in {save})"]
    assert "Traceback" not in proc.stderr
    assert sorted(p for p in os.listdir(save) if p.startswith("iter_")) == ["iter_0000001"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # what was logged up to the stop is in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    tb = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in tb.Scalars("lm loss")] == [1, 2]


def test_replicas_that_drift_apart_stop_every_rank(training_env, tmp_path):
    """DP=2: a trained expert weight nudged on rank 1 after step 2; both ranks stop at the check of iteration 2."""
    env = training_env
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAULT, "trained", "2", "1",
                "--load", env["base"], "--train-data", env["data"], *TRAIN, "--expert-config", env["ecfg"],
                "--train-iters", "3", "--check-weight-hash-across-dp-replicas-interval", "2"], check=False)
    name = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAULT "))
    assert proc.returncode != 0
    errors = sorted(_error_lines(proc))
    assert errors == [f"error: iteration 2: weight {name} differs across the expert-data-parallel replicas "
                      f"(rank {r}); the replicas no longer train the same model; stopped (this run saved no "
                      "checkpoint)" for r in (0, 1)], proc.stderr[-3000:]
    assert " iteration        2/" in proc.stdout and " iteration        3/" not in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fingerprint_on_the_gpu_is_the_cpu_one():
    """On a GPU every tensor is hashed there, also one in host memory (--offload-frozen-experts): the same integers
    as the CPU computation, for tensors larger than one chunk."""
    tensors = [torch.randn(3, weight_checks._CHUNK + 5, generator=torch.Generator().manual_seed(2)).to(dtype)
               for dtype in (torch.bfloat16, torch.float32)]
    on_cpu = weight_checks.fingerprints(tensors, device=torch.device("cpu"))
    assert torch.equal(weight_checks.fingerprints([t.cuda() for t in tensors]), on_cpu)
    assert torch.equal(weight_checks.fingerprints(tensors), on_cpu)  # host tensors, hashed on the GPU
