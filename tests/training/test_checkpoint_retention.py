"""--save-retain-interval (Megatron-LM's flag; checkpoint/retention.py) in the trainer: every N-th iteration and the
newest stay, the best-validation directory keeps only its newest (best) iteration, training is unchanged."""

import os

import pytest

from training_helpers import losses, pretrain
from megatron_esft.checkpoint.mcore_checkpoint import read_tracker
from megatron_esft.errors import UserError
from megatron_esft.training.arguments import build_parser, validate


def _iterations(root) -> list[int]:
    return sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_"))


def test_the_run_keeps_every_second_iteration_and_the_best(training_env, reference, tmp_path):
    env = training_env
    save = str(tmp_path / "out")
    proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], "--train-iters", "5", "--save-interval", "1",
                    "--save-retain-interval", "2", "--eval-interval", "1", data=env["data"])
    assert losses(proc) == reference["losses"][:5]
    assert _iterations(save) == [2, 4, 5] and read_tracker(save) == 5
    for gone in (1, 3):
        assert f"removed checkpoint at iteration {gone:7d} from {save} (superseded by iteration {gone + 1})" \
            in proc.stdout
    best = os.path.join(save, "best")
    assert _iterations(best) == [read_tracker(best)]  # earlier best iterations were worse ones
    assert f"from {best} (superseded by iteration" in proc.stdout


@pytest.mark.parametrize("flags", [["--save-retain-interval", "3"],
                                   ["--save-retain-interval", "4", "--save-interval", "0"]])
def test_retain_interval_needs_a_save_interval_it_is_a_multiple_of(flags):
    args = build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "4", "--seq-length", "8",
                                      "--lr", "1e-3", "--save", "s", "--save-interval", "2", *flags])
    with pytest.raises(UserError, match="--save-retain-interval|--save-interval 0"):
        validate(args, 1)
