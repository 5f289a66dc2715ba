"""Megatron-LM's --exit-signal-handler and --exit-duration-in-mins: when to stop a run cleanly (save, then exit),
decided the same on every rank."""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from megatron_esft import parallel as par


class ExitSignalHandler:
    """Megatron-LM's --exit-signal-handler: on SIGTERM (what Slurm sends before the time limit, and what the sbatch
    scripts' USR1 trap forwards), finish the current iteration, save, and exit cleanly (see `exit_requested`)."""

    def __init__(self, enabled: bool, signum: int = signal.SIGTERM):
        self.enabled, self.signum, self.received = enabled, signum, False
        self._previous = signal.signal(signum, self._handle) if enabled else None

    def _handle(self, signum, frame):
        self.received = True

    def restore(self) -> None:
        if self.enabled:
            signal.signal(self.signum, self._previous)


def exit_requested(signals: ExitSignalHandler, args, start_time: float) -> tuple[bool, float | None]:
    """(stop now, minutes since start-up when --exit-duration-in-mins ran out). Every rank calls it at the same point
    of the loop and the conditions are all-reduced, so all ranks stop at the same iteration even when only one of
    them got the signal or its clock ran past the limit first (Megatron-LM decides both the same way)."""
    if not signals.enabled and args.exit_duration_in_mins is None:
        return False, None
    minutes = (time.time() - start_time) / 60.0
    flags = torch.tensor([float(signals.received),
                          float(args.exit_duration_in_mins is not None and minutes > args.exit_duration_in_mins)])
    if dist.is_initialized():
        par.all_reduce(flags, op=dist.ReduceOp.MAX)
    signaled, timed_out = bool(flags[0]), bool(flags[1])
    return signaled or timed_out, minutes if timed_out else None
