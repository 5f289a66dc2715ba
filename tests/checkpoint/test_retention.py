"""checkpoint/retention.py (Megatron-LM's --save-retain-interval) through mcore_checkpoint.save_checkpoint: which
iterations a directory keeps as saves go on, what is never removed, and an interrupted removal's leftover."""

import os

import pytest
import torch

from megatron_esft.checkpoint import retention
from megatron_esft.checkpoint.mcore_checkpoint import read_tracker, save_checkpoint


@pytest.mark.parametrize("previous, saved, interval, protected, expected", [
    (2, 4, 4, set(), 2), (4, 6, 4, set(), None), (2, 4, None, set(), None), (2, 4, 0, set(), 2),
    (8, 8, 0, set(), None), (9, 4, 4, set(), None), (2, 4, 4, {2}, None), (None, 4, 4, set(), None),
])
def test_what_goes(previous, saved, interval, protected, expected):
    assert retention.to_remove(previous, saved, interval, protected) == expected


@pytest.fixture(scope="module")
def process_group():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)  # with the CPU compat layer dist_checkpointing needs


def _state():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0), replica_id=0)}


def _iterations(root) -> list[int]:
    return sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_"))


def test_saves_keep_every_nth_and_the_newest(tmp_path, process_group, capsys):
    root = str(tmp_path / "ckpt")
    for it in range(1, 8):
        save_checkpoint(root, it, _state(), {}, retain_interval=3, protected=frozenset({1}))
    assert _iterations(root) == [1, 3, 6, 7] and read_tracker(root) == 7  # 1: protected (the run's base)
    assert "removed checkpoint at iteration       5 from" in capsys.readouterr().out
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # nothing hidden left behind
    # a run resumed from an earlier iteration (--ckpt-step 3) leaves the later ones alone
    save_checkpoint(root, 4, _state(), {}, retain_interval=3)
    assert _iterations(root) == [1, 3, 4, 6, 7] and read_tracker(root) == 4
    # keep only the newest (the best-validation directory)
    save_checkpoint(root, 5, _state(), {}, retain_interval=0)
    assert _iterations(root) == [1, 3, 5, 6, 7]


def test_an_interrupted_removal_is_finished_by_the_next_save(tmp_path, process_group):
    root = str(tmp_path / "ckpt")
    save_checkpoint(root, 1, _state(), {})
    leftover = os.path.join(root, ".iter_0000000" + retention.REMOVING + "deadbeef")
    os.makedirs(os.path.join(leftover, "x"))
    save_checkpoint(root, 2, _state(), {})
    assert not os.path.exists(leftover) and _iterations(root) == [1, 2]
