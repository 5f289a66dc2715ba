"""Resuming with another learning-rate schedule (Megatron-LM's --override-opt_param-scheduler and
--use-checkpoint-opt_param-scheduler): refused without either flag instead of silently keeping the checkpoint's;
with one of them the logged learning rate is the command line's or the checkpoint's."""

import re

import pytest

from training_helpers import pretrain
from megatron_esft.training.arguments import build_parser, validate
from megatron_esft.training.setup import build_scheduler, schedule_differences, schedule_settings


def _args(*extra):
    return validate(build_parser().parse_args(["--load", "x", "--train-data", "d", "--train-iters", "10",
                                               "--seq-length", "8", "--lr", "1e-3", *extra]), 1)


def test_schedule_differences_name_the_flags_that_matter():
    saved = schedule_settings(_args())
    assert schedule_differences(_args(), saved) == []
    # a constant schedule has no decay: its length (here from --train-iters) and --min-lr do not change it
    assert schedule_differences(_args("--train-iters", "20", "--min-lr", "1e-5"), saved) == []
    assert schedule_differences(_args("--lr", "5e-4", "--weight-decay", "0"), saved) == [
        "--lr 0.0005 (checkpoint: 0.001)", "--weight-decay 0.0 (checkpoint: 0.1)"]
    assert schedule_differences(_args("--lr-warmup-iters", "2"), saved) == [
        "--lr-warmup-iters/--lr-warmup-fraction 2 (checkpoint: 0)"]
    cosine = schedule_settings(_args("--lr-decay-style", "cosine", "--min-lr", "1e-5"))
    assert schedule_differences(_args("--lr-decay-style", "cosine", "--min-lr", "1e-5", "--train-iters", "20"),
                                cosine) == ["--lr-decay-iters (default: --train-iters) 20 (checkpoint: 10)"]
    assert schedule_differences(_args("--lr-decay-style", "cosine", "--min-lr", "0"), cosine) == [
        "--min-lr 0.0 (checkpoint: 1e-05)"]
    assert schedule_differences(_args(), cosine) == ["--lr-decay-style constant (checkpoint: cosine)"]


def test_warmup_fraction_and_init_follow_megatron_lm():
    """--lr-warmup-fraction warms up over a (float) fraction of the decay length, from --lr-warmup-init; the rates of
    Megatron-Core's scheduler built from them equal the schedule computed here in float64."""
    import torch

    args = _args("--lr-warmup-fraction", "0.25", "--lr-warmup-init", "1e-4", "--lr-decay-style", "linear",
                 "--min-lr", "1e-5")
    assert schedule_settings(args)["lr_warmup_steps"] == 2.5  # 0.25 x --train-iters 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = build_scheduler(args, optimizer)
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    warmup, peak, init, floor = 2.5, 1e-3, 1e-4, 1e-5
    expected = [init + (peak - init) * k / warmup if k <= warmup else
                floor + (peak - floor) * (1 - (k - warmup) / (10 - warmup)) for k in range(11)]
    assert rates == pytest.approx(expected, rel=1e-12)
    # a resumed run names both warm-up flags when they set another warm-up
    assert schedule_differences(_args("--lr-warmup-fraction", "0.2"), schedule_settings(_args())) == [
        "--lr-warmup-iters/--lr-warmup-fraction 2.0 (checkpoint: 0)"]


@pytest.mark.parametrize("flags, message", [
    (("--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"), "exclude each other"),
    (("--lr-warmup-fraction", "1"), r"--lr-warmup-fraction 1.0: must be in \[0, 1\)"),
    (("--lr-warmup-init", "2e-3"), r"--lr-warmup-init 0.002: must be in 0..--lr \(0.001\)"),
])
def test_bad_warmup_flags(flags, message):
    from megatron_esft.errors import UserError

    with pytest.raises(UserError, match=message):
        _args(*flags)


def _lr(proc) -> list[float]:
    return [float(x) for x in re.findall(r"^ iteration .*\| learning rate: ([0-9.E+-]+)", proc.stdout, re.M)]


def test_resume_with_another_lr_needs_a_flag_that_says_which_wins(training_env, reference, tmp_path):
    env = training_env
    save = tmp_path / "refused"
    refused = pretrain(reference["save"], str(save), "--train-iters", "7", "--lr", "5e-4", data=env["data"],
                       check=False)
    assert refused.returncode == 2, refused.stdout[-2000:]
    assert refused.stderr.strip().splitlines() == [
        f"error: --load {reference['save']}: the schedule differs from the checkpoint's: --lr 0.0005 (checkpoint: "
        "0.001); pass --override-opt_param-scheduler to continue with this command's, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"]
    assert not save.exists()

    assert _lr(reference["proc"]) == [1e-3] * 6
    override = pretrain(reference["save"], None, "--train-iters", "7", "--lr", "5e-4",
                        "--override-opt_param-scheduler", data=env["data"])
    assert _lr(override) == [5e-4]
    kept = pretrain(reference["save"], None, "--train-iters", "7", "--lr", "5e-4",
                    "--use-checkpoint-opt_param-scheduler", data=env["data"])
    assert _lr(kept) == [1e-3]


def test_the_two_flags_exclude_each_other():
    from megatron_esft.errors import UserError

    with pytest.raises(UserError, match="exclude each other"):
        _args("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler")
