"""Megatron-LM's `--timing-log-level`: Megatron-Core's own timers, read where Megatron-LM reads them.

Megatron-Core's schedules, gradient finalization and optimizer already time their parts when the model's config (and
the optimizer's) carries a `megatron.core.timers.Timers` (`forward-backward`, `all-grads-sync`, `optimizer-*` at
level 1; `forward-compute`, `backward-compute` and the pipeline's send/recv at level 2); the trainer adds Megatron-LM's
`optimizer` (level 1) and `batch-generator` (level 2, the micro-batch's copy to the device). At every log interval the
last rank prints Megatron-LM's block

    (min, max) time across ranks (ms):
        forward-backward ...............................: (470.26, 470.60)

(`--timing-log-option max | minmax | all`), averaged over the interval's iterations, and `--log-timers-to-tensorboard`
writes each as `<name>-time`. The timers synchronize the device at every start and stop (and level 1 ones start with
a barrier unless `--no-barrier-with-level-1-timing`), which costs time and which a CUDA graph cannot capture: level 0,
the default, creates no timers at all. Evaluation runs untimed, as in Megatron-LM.
"""

from __future__ import annotations

import argparse
import contextlib

import torch.distributed as dist

from megatron_esft.errors import UserError

LEVEL_1 = ("forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce", "all-grads-sync",
           "params-all-gather", "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf",
           "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
           "optimizer-copy-main-to-model-params", "optimizer")
LEVEL_2 = ("batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send", "backward-recv",
           "backward-send", "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
           "backward-send-backward-recv", "forward-backward-send-forward-backward-recv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("timers (Megatron-LM's flags)")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="0: the iteration time only; 1: also Megatron-Core's per-iteration parts (forward-backward, "
                        "gradient all-reduce, optimizer steps); 2: also the per-micro-batch ones (forward-compute, "
                        "backward-compute, pipeline send/recv). 1 and 2 synchronize the device at each timer")
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"], default="minmax",
                   help="over ranks: the max, the min and max, or every rank's time")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the timers to TensorBoard as <name>-time")
    g.add_argument("--no-barrier-with-level-1-timing", action="store_false", dest="barrier_with_L1_time",
                   help="no barrier before the level-1 timers start (they then include waiting for other ranks)")


def validate(args: argparse.Namespace) -> None:
    if args.log_timers_to_tensorboard and (args.timing_log_level == 0 or not args.tensorboard_dir):
        raise UserError("--log-timers-to-tensorboard needs --timing-log-level 1 or 2 and --tensorboard-dir")
    if args.timing_log_level and args.cuda_graph_impl != "none":
        raise UserError(f"--timing-log-level {args.timing_log_level} with --cuda-graph-impl {args.cuda_graph_impl}: "
                        "the timers synchronize the device inside the iteration, which a CUDA graph cannot capture")


def names(level: int) -> list[str]:
    return list(LEVEL_1 if level >= 1 else ()) + list(LEVEL_2 if level >= 2 else ())


def install(args: argparse.Namespace, ddp_model, optimizer):
    """Megatron-Core timers on the model's and the optimizer's configs, or None at level 0."""
    if not args.timing_log_level:
        return None
    from megatron.core.timers import Timers

    timers = Timers(args.timing_log_level, args.timing_log_option)
    configs = [ddp_model.config] + [o.config for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for config in configs:
        config.timers, config.barrier_with_L1_time = timers, args.barrier_with_L1_time
    return timers


@contextlib.contextmanager
def timed(timers, name: str, level: int, barrier: bool = False):
    """A block under timer `name` (nothing without timers)."""
    if timers is None:
        yield
        return
    timers(name, log_level=level).start(barrier=barrier)
    try:
        yield
    finally:
        timers(name).stop()


@contextlib.contextmanager
def paused(ddp_model):
    """Evaluation: Megatron-Core's schedules untimed (the interval's training times stay as they were)."""
    config = ddp_model.config
    timers, config.timers = config.timers, None
    try:
        yield
    finally:
        config.timers = timers


def log(timers, args: argparse.Namespace, writer, iteration: int, iterations: int) -> None:
    """The interval's timers (averaged over its `iterations`): to TensorBoard with --log-timers-to-tensorboard, then
    Megatron-LM's block on the last rank; a collective (every rank calls it)."""
    if timers is None:
        return
    timed_names = names(args.timing_log_level)
    if args.log_timers_to_tensorboard:
        timers.write(timed_names, writer, iteration, normalizer=iterations, reset=False)
    # (Timers.log hands the block to Python's logging, which the trainer does not route to stdout)
    block = timers.get_all_timers_string(timed_names, normalizer=iterations, reset=True)
    if block is not None and dist.get_rank() == dist.get_world_size() - 1:
        print(block, flush=True)
