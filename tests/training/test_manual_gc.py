"""--manual-gc (training/manual_gc.py): the collections Python runs, seen through gc.callbacks, at the points
Megatron-LM runs them and nowhere else; the trainer with it trains the same; the flags' errors."""

from __future__ import annotations

import gc

import pytest

from training_helpers import losses, pretrain
from megatron_esft.errors import UserError
from megatron_esft.training import manual_gc
from megatron_esft.training.arguments import build_parser


def _args(*extra: str):
    return build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "6", "--seq-length", "8",
                                      "--lr", "1e-3", *extra])


@pytest.fixture
def collections():
    """The generations of the collections started while the test runs (automatic ones included)."""
    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    was_enabled = gc.isenabled()
    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)
        if was_enabled:
            gc.enable()


def _quiet(collections):
    """Start counting from here, with gen 0's allocation count at zero: the few allocations until the next
    explicit collection cannot start an automatic one."""
    gc.collect()
    collections.clear()


def _make_cyclic_garbage(n=20_000):
    for _ in range(n):  # far past gen 0's threshold (700 allocations): automatic collections if enabled
        a = []
        a.append(a)


def test_collections_happen_only_where_megatron_runs_them(collections):
    collector = manual_gc.ManualGC(_args("--manual-gc", "--manual-gc-interval", "3"))
    _quiet(collections)
    collector.start()
    assert not gc.isenabled() and collections == [2]
    for iteration in range(1, 7):
        _make_cyclic_garbage()
        collector.after_iteration(iteration)
    assert collections == [2, 2, 2]  # after iterations 3 and 6; no automatic ones between
    with collector.evaluation():
        _make_cyclic_garbage()
        assert collections == [2, 2, 2, 2]  # a full collection before the evaluation
    assert collections == [2, 2, 2, 2, 0]  # and of the youngest generation after it
    collector.stop()
    assert gc.isenabled()
    assert "every 3 iterations, before and after each evaluation" in collector.describe()


def test_without_the_flag_or_around_evaluation_nothing_is_collected_by_it(collections):
    off, no_eval = manual_gc.ManualGC(_args()), manual_gc.ManualGC(_args("--manual-gc", "--no-manual-gc-eval"))
    _quiet(collections)
    off.start()
    assert gc.isenabled()
    off.after_iteration(1)
    with off.evaluation():
        pass
    assert collections == []
    no_eval.start()
    no_eval.after_iteration(3)  # interval 0: never between steps
    with no_eval.evaluation():
        pass
    no_eval.stop()
    assert collections == [2] and gc.isenabled()


def test_trainer_with_manual_gc_trains_the_same(training_env, reference):
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--eval-interval", "3", "--manual-gc", "--manual-gc-interval", "2", data=training_env["data"])
    assert losses(proc) == reference["losses"][:3]
    assert ("manual garbage collection: automatic collection off; collecting before training, every 2 iterations, "
            "before and after each evaluation") in proc.stdout


@pytest.mark.parametrize("extra, message", [
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval -1: must be at least 0"),
    (["--manual-gc-interval", "5"], "--manual-gc-interval needs --manual-gc"),
    (["--no-manual-gc-eval"], "--no-manual-gc-eval needs --manual-gc"),
])
def test_bad_manual_gc_flags(extra, message):
    with pytest.raises(UserError, match=message):
        manual_gc.validate(_args(*extra))
