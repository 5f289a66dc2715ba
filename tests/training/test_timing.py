"""--timing-log-level (training/timing.py): Megatron-LM's `(min, max) time across ranks (ms):` block from
Megatron-Core's timers at every log interval, with the level's timers only, evaluation untimed, the same losses, the
timers in TensorBoard; the flags' one-line errors."""

from __future__ import annotations

import re
import types

import pytest

from training_helpers import losses, pretrain
from megatron_esft.errors import UserError
from megatron_esft.training import timing
from megatron_esft.training.arguments import build_parser

BLOCK = re.compile(r"^\(min, max\) time across ranks \(ms\):\n((?:    \S+ \.+: \([0-9.]+, [0-9.]+\)\n)+)", re.M)


def _blocks(stdout: str) -> list[dict[str, tuple[float, float]]]:
    line = re.compile(r"    (\S+) \.+: \(([0-9.]+), ([0-9.]+)\)")
    return [{m.group(1): (float(m.group(2)), float(m.group(3))) for m in line.finditer(block)}
            for block in BLOCK.findall(stdout)]


def test_level_2_prints_megatron_core_timers_every_log_interval(training_env, reference):
    tb = training_env["root"] / "timing-tb"
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "4",
                    "--log-interval", "2", "--eval-interval", "2", "--timing-log-level", "2",
                    "--log-timers-to-tensorboard", "--tensorboard-dir", str(tb), data=training_env["data"])
    assert losses(proc) == pytest.approx([sum(reference["losses"][0:2]) / 2, sum(reference["losses"][2:4]) / 2],
                                         rel=1e-6)  # the interval's mean (the log prints 7 digits)
    blocks = _blocks(proc.stdout)
    assert len(blocks) == 2
    for times in blocks:
        # Megatron-Core's own timers (schedules, gradient finalization, optimizer) and the trainer's
        assert {"forward-backward", "forward-compute", "backward-compute", "all-grads-sync", "optimizer-inner-step",
                "optimizer", "batch-generator"} <= times.keys() <= set(timing.LEVEL_1 + timing.LEVEL_2)
        # one rank: min == max; the parts fit in the wholes they are part of
        assert all(lo == hi > 0 for lo, hi in times.values())
        assert times["forward-compute"][0] + times["backward-compute"][0] <= times["forward-backward"][0]
        assert times["optimizer-inner-step"][0] <= times["optimizer"][0]
    # averaged per iteration as the iteration time is: a part of it
    ms_per_iteration = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", proc.stdout)]
    assert all(t["forward-backward"][0] < ms for t, ms in zip(blocks, ms_per_iteration))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("forward-backward-time")] == [2, 4]


def test_level_1_leaves_out_the_per_micro_batch_timers(training_env):
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "2",
                    "--log-interval", "2", "--timing-log-level", "1", "--timing-log-option", "max",
                    data=training_env["data"])
    assert "max time across ranks (ms):\n    forward-backward ..." in proc.stdout
    timed = set(re.findall(r"^    (\S+) \.+: [0-9.]+$", proc.stdout, re.M))
    assert "optimizer" in timed and timed <= set(timing.LEVEL_1)


def test_evaluation_runs_untimed():
    """Megatron-LM sets the config's timers to None while it evaluates: the forward-only passes over the validation
    set stay out of forward-backward / forward-compute."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(timers="the timers"))
    with timing.paused(model):
        assert model.config.timers is None
    assert model.config.timers == "the timers"


def test_level_0_creates_no_timers(reference):
    assert "time across ranks" not in reference["proc"].stdout


def _args(*extra: str):
    return build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "6", "--seq-length", "8",
                                      "--lr", "1e-3", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--log-timers-to-tensorboard", "--tensorboard-dir", "tb"], "needs --timing-log-level 1 or 2 and --tensorboard"),
    (["--timing-log-level", "1", "--log-timers-to-tensorboard"], "needs --timing-log-level 1 or 2 and --tensorboard"),
    (["--timing-log-level", "2", "--cuda-graph-impl", "local"], "which a CUDA graph cannot capture"),
])
def test_bad_timing_flags(extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        timing.validate(_args(*extra))
