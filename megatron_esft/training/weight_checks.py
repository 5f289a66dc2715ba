"""Checks that the weights are what they must be while training: frozen weights bit-identical, replicas equal.

* **Frozen weights** (ours; on by default): ESFT's promise is that everything but the selected experts stays bit for
  bit as loaded. The optimizer never sees the frozen parameters, but a bug elsewhere (an in-place op in a custom
  kernel, a cache written back, a wrong view into DDP's buffer) would change them silently, and every checkpoint and
  export after it would carry the damage. So the frozen parameters' fingerprints are taken when training starts and
  compared before every checkpoint save (a checkpoint never holds changed frozen weights), at the end, and every
  `--check-frozen-weights-interval` iterations; `--no-check-frozen-weights` turns it off.
* **Replicas** (Megatron-LM's `--check-weight-hash-across-dp-replicas-interval N`): every N iterations, every
  parameter must be the same on all data-parallel replicas (expert parameters: on the expert-data-parallel replicas).
  Replicas that drift apart (a nondeterministic reduction, a faulty GPU) train different models from then on.

A fingerprint is an exact integer function of a tensor's bits, computed on the GPU where there is one (also for
weights kept in host memory, `--offload-frozen-experts`): no float rounding, the same on every device and in any
summation order. Megatron-Core's `check_param_hashes_across_dp_replicas` instead copies every parameter to the host
as fp32 and SHA-1s it there (~63 GB for DeepSeek-V2-Lite's 15.7B parameters). A failed check stops every rank at the
same point with one line (exit status 1) naming the tensor.
"""

from __future__ import annotations

import argparse

import torch

from megatron_esft import parallel as par
from megatron_esft.errors import RunStopped, UserError

_CHUNK = 1 << 22  # elements per pass: bounds the int64 temporaries (32 MiB each)
_MODULUS = 1_000_003  # a prime: position weights 1..MODULUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("weight checks")
    g.add_argument("--check-frozen-weights-interval", type=int, default=0, metavar="ITERATIONS",
                   help="also compare the frozen weights with their values at the start of training every this many "
                        "iterations (they are compared before every checkpoint save and at the end anyway)")
    g.add_argument("--no-check-frozen-weights", action="store_false", dest="check_frozen_weights",
                   help="do not compare the frozen weights with their values at the start of training")
    g.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, default=None, metavar="ITERATIONS",
                   help="every this many iterations, stop unless every weight is the same on all data-parallel "
                        "replicas (Megatron-LM's flag)")


def validate(args: argparse.Namespace) -> None:
    if args.check_frozen_weights_interval < 0:
        raise UserError(f"--check-frozen-weights-interval {args.check_frozen_weights_interval}: must be at least 0")
    if args.check_frozen_weights_interval and not args.check_frozen_weights:
        raise UserError("--check-frozen-weights-interval and --no-check-frozen-weights contradict each other")
    interval = args.check_weight_hash_across_dp_replicas_interval
    if interval is not None and interval < 1:
        raise UserError(f"--check-weight-hash-across-dp-replicas-interval {interval}: must be at least 1")


def _as_integers(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    kinds = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if flat.element_size() not in kinds or flat.is_complex():
        raise TypeError(f"cannot fingerprint a {flat.dtype} tensor")
    return flat.view(kinds[flat.element_size()])


def fingerprints(tensors, device: torch.device | None = None) -> torch.Tensor:
    """One int64 per tensor, an exact function of its bits (and their positions): sum(v_i * w_i) + sum(v_i ^ w_i)
    over its elements' bit patterns v_i, with w_i = i mod 1000003 + 1, wrapping modulo 2^64. Any single changed
    element changes it. Computed on `device` (default: the current GPU if any, else where each tensor is), chunk by
    chunk; returned on the CPU (one copy for all)."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    sums = []
    for tensor in tensors:
        bits = _as_integers(tensor)
        where = device or bits.device
        acc = torch.zeros((), dtype=torch.int64, device=where)
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start:start + _CHUNK].to(where).to(torch.int64)
            weights = (torch.arange(chunk.numel(), device=where, dtype=torch.int64) + start) % _MODULUS + 1
            acc += (chunk * weights).sum() + (chunk ^ weights).sum()
        sums.append(acc if device is not None else acc.cpu())  # without a device: tensors may be anywhere
    if not sums:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(sums).cpu()


def _named_parameters(model_chunks):
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    prefix = len(chunks) > 1
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            yield (f"model chunk {index}: {name}" if prefix else name), param


def _stop_everywhere(local_problem: str | None, world_problem: str) -> None:
    """Raise RunStopped on every rank if any rank has a problem (a collective: every rank must call it)."""
    flag = torch.tensor([0.0 if local_problem is None else 1.0])
    par.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise RunStopped(local_problem or world_problem)


class FrozenWeightsCheck:
    """Fingerprints of the frozen parameters when made (the start of training); `check(when, consequence)` compares
    and stops every rank on a change. `enabled=False` makes every call a no-op."""

    def __init__(self, model_chunks, enabled: bool = True, interval: int = 0):
        self.enabled, self.interval, self.checks, self._checked_at = enabled, interval, 0, None
        self.named = [(name, p) for name, p in _named_parameters(model_chunks) if not p.requires_grad] \
            if enabled else []
        self.reference = fingerprints([p for _, p in self.named])

    def due(self, iteration: int) -> bool:
        return self.enabled and bool(self.interval) and iteration % self.interval == 0

    def check(self, iteration: int) -> None:
        """Compare after `iteration` (once per iteration: a save and the interval at the same one check once). A
        collective on every rank; the caller adds to the RunStopped's message what the stop kept."""
        if not self.enabled or iteration == self._checked_at:
            return
        when = f"iteration {iteration}"
        changed = (fingerprints([p for _, p in self.named]) != self.reference).nonzero().flatten().tolist()
        self.checks, self._checked_at = self.checks + 1, iteration
        local = None
        if changed:
            more = f" and {len(changed) - 1} more of the {len(self.named)} frozen tensors" if len(changed) > 1 else ""
            local = (f"{when}: frozen weight {self.named[changed[0]][0]}{more} changed since the start of training "
                     f"(rank {torch.distributed.get_rank()}); ESFT keeps every frozen weight bit-identical, so this is "
                     "a bug")
        _stop_everywhere(local, f"{when}: a frozen weight changed on another rank (its error names it)")

    def summary(self) -> str | None:
        if not self.enabled or not self.checks or not self.named:
            return None
        count = sum(p.numel() for _, p in self.named)
        times = f"{self.checks} time{'s' if self.checks != 1 else ''}"
        return (f"frozen weights bit-identical to the start of training on every rank: checked {times} "
                f"(rank {torch.distributed.get_rank()}: {len(self.named)} tensors, {count:,} parameters)")


def check_replicas(model_chunks, iteration: int) -> None:
    """Megatron-LM's check: every parameter the same on all data-parallel replicas (expert parameters, marked
    `allreduce = False` by Megatron-Core, on the expert-data-parallel replicas). The weights must be up to date
    (with --overlap-param-gather: inside `setup.parameters_gathered`). A collective on every rank; the caller adds
    to the RunStopped's message what the stop kept."""
    from megatron.core import parallel_state as ps

    dense, expert = [], []
    for name, param in _named_parameters(model_chunks):
        (dense if getattr(param, "allreduce", True) else expert).append((name, param))
    local, rank = None, torch.distributed.get_rank()
    for named, group, kind in ((dense, ps.get_data_parallel_group(), "data-parallel"),
                               (expert, ps.get_expert_data_parallel_group(), "expert-data-parallel")):
        if not named or torch.distributed.get_world_size(group) == 1:
            continue
        mine = fingerprints([p for _, p in named])
        low, high = mine.clone(), mine.clone()
        par.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
        par.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
        differ = (low != high).nonzero().flatten().tolist()
        if differ and local is None:
            more = f" and {len(differ) - 1} more tensors" if len(differ) > 1 else ""
            local = (f"iteration {iteration}: weight {named[differ[0]][0]}{more} differs across the {kind} "
                     f"replicas (rank {rank}); the replicas no longer train the same model")
    _stop_everywhere(local, f"iteration {iteration}: weights differ across the data-parallel replicas of other "
                            "ranks (their errors name the tensors)")
