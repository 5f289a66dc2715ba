"""Megatron-LM's profiling flags for a training run.

* `--profile --use-pytorch-profiler`: a torch.profiler trace of the chosen iterations (host ops, and kernels on a GPU)
  for Perfetto, chrome://tracing or TensorBoard's trace viewer: where a real job's step time goes, the question
  `bench/gpu_esft.py --profile` answers for the benchmark's model.
* `--profile` alone: nsys's capture range. The run calls cudaProfilerStart/Stop around the chosen iterations, for
  `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop ...` (needs CUDA).

Which iterations: `--profile-step-start S --profile-step-end E` profiles the steps run after S iterations are done
until E are done, i.e. the iterations logged as S+1 ... E (E - S of them; Megatron-LM's nsys mode; its
PyTorch-profiler mode traces the iterations one earlier, S ... E-1, because its profiler counts the empty span
before the first iteration as a step). The numbers are global: a resumed run profiles what is left of the window.
With the torch profiler, iteration S, when this run runs it, is the profiler's warm-up (traced, then dropped: the
first traced step otherwise carries the tracer's start-up cost).

The trace of each profiled rank (`--profile-ranks`, default every rank) is
`<--tensorboard-dir>/../torch_profile/rank-<R>.json.gz`, as Megatron-LM writes it, written when the last profiled
iteration ends (or when the run stops early), atomically. Each iteration is an `iteration N` range on the host
timeline, next to torch's own `ProfilerStep#K` (K counts from the first traced step, the warm-up when there is one).

`--record-memory-history` (GPU): the CUDA caching allocator records every allocation and free with its Python stack
from start-up on (before the model is built) on the ranks of `--profile-ranks`, and a snapshot goes to
`--memory-snapshot-path` with `_<rank>` before the extension at every `--log-interval` and when the GPU runs out of
memory (`_oom_<rank>`): what was live at the failure, and who allocated it (open it at pytorch.org/memory_viz).
As Megatron-LM; it does not need `--profile`.
"""

from __future__ import annotations

import argparse
import os

import torch

from megatron_esft.atomic import atomic_write_file
from megatron_esft.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profiling (Megatron-LM's flags)")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start+1 .. --profile-step-end: with "
                        "--use-pytorch-profiler a torch.profiler trace, else nsys's capture range "
                        "(cudaProfilerStart/Stop; run under `nsys profile --capture-range=cudaProfilerApi "
                        "--capture-range-end=stop`)")
    g.add_argument("--profile-step-start", type=int, default=10, metavar="ITERATION",
                   help="profile the iterations after this many are done (default 10)")
    g.add_argument("--profile-step-end", type=int, default=12, metavar="ITERATION",
                   help="... until this many are done (default 12: iterations 11 and 12)")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[], metavar="RANK",
                   help="global ranks to profile (default: every rank)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: write a torch.profiler trace per profiled rank to "
                        "<--tensorboard-dir>/../torch_profile/rank-R.json.gz")
    g.add_argument("--pytorch-profiler-collect-shapes", action="store_true",
                   help="record the ops' input shapes in the trace")
    g.add_argument("--pytorch-profiler-collect-callstack", action="store_true",
                   help="record the Python call stack of each op in the trace")
    g.add_argument("--record-memory-history", action="store_true",
                   help="GPU: record the CUDA allocator's history from start-up on (the ranks of --profile-ranks) and "
                        "write a snapshot at every --log-interval and on running out of memory (pytorch.org/memory_viz)")
    g.add_argument("--memory-snapshot-path", default="snapshot.pickle",
                   help="where --record-memory-history writes, with _RANK (_oom_RANK) before the extension")


def validate(args: argparse.Namespace, world_size: int) -> None:
    """One-line errors for flags that would profile nothing or cannot work here."""
    collect = [flag for flag, given in (("--pytorch-profiler-collect-shapes", args.pytorch_profiler_collect_shapes),
                                        ("--pytorch-profiler-collect-callstack",
                                         args.pytorch_profiler_collect_callstack)) if given]
    torch_flags = ["--use-pytorch-profiler"] * args.use_pytorch_profiler + collect
    if bad := [r for r in args.profile_ranks if not 0 <= r < world_size]:
        raise UserError(f"--profile-ranks {bad[0]}: no such rank (world size {world_size})")
    if args.record_memory_history and not torch.cuda.is_available():
        raise UserError("--record-memory-history records the CUDA caching allocator's history: it needs a GPU")
    if not args.profile:
        if torch_flags:
            raise UserError(f"{torch_flags[0]} needs --profile")
        return
    if collect and not args.use_pytorch_profiler:
        raise UserError(f"{collect[0]} needs --use-pytorch-profiler")
    start, end = args.profile_step_start, args.profile_step_end
    if start < 0 or end <= start:
        raise UserError(f"--profile-step-start {start} --profile-step-end {end}: need 0 <= start < end (iterations "
                        f"start+1 .. end are profiled)")
    if start >= args.train_iters:
        raise UserError(f"--profile-step-start {start}: the run ends at --train-iters {args.train_iters}, so nothing "
                        "would be profiled")
    if args.use_pytorch_profiler and not args.tensorboard_dir:
        raise UserError("--use-pytorch-profiler writes its traces next to --tensorboard-dir "
                        "(<dir>/../torch_profile/rank-R.json.gz): give --tensorboard-dir")
    if not args.use_pytorch_profiler and not torch.cuda.is_available():
        raise UserError("--profile without --use-pytorch-profiler opens nsys's capture range (cudaProfilerStart), "
                        "which needs a GPU; add --use-pytorch-profiler for a torch.profiler trace")


def _iterations(first: int, last: int) -> str:
    return f"iteration {first}" if first == last else f"iterations {first}..{last}"


def _profiled_rank(args: argparse.Namespace, rank: int) -> bool:
    return not args.profile_ranks or rank in args.profile_ranks


def trace_path(tensorboard_dir: str, rank: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "torch_profile", f"rank-{rank}.json.gz")


class IterationProfiler:
    """Drives the profiler from the train loop: `begin(n)` before and `end(n)` after the iteration logged as n, and
    `close()` when the loop stops (early or not). Does nothing on ranks or runs outside the window."""

    def __init__(self, args: argparse.Namespace, rank: int, iterations_done: int, announce=print):
        self.torch_profiler = args.use_pytorch_profiler
        self.first = max(args.profile_step_start, iterations_done) + 1  # the first profiled iteration
        self.last = min(args.profile_step_end, args.train_iters)
        self.enabled = args.profile and _profiled_rank(args, rank) and self.first <= self.last
        # the torch profiler's warm-up: the iteration before the window, when this run runs it
        self.warmup = int(self.torch_profiler and args.profile_step_start > iterations_done)
        self.path = trace_path(args.tensorboard_dir, rank) if self.torch_profiler else None
        self.shapes, self.stack = args.pytorch_profiler_collect_shapes, args.pytorch_profiler_collect_callstack
        self.announce = announce
        self._profiler = None
        self._range = None
        self._capturing = False  # nsys's range is open
        self._ended = None  # the last iteration the torch profiler saw end
        if args.profile and self.first > self.last and _profiled_rank(args, rank):
            announce(f"--profile: {_iterations(args.profile_step_start + 1, args.profile_step_end)} were done before "
                     f"this run (it resumes after iteration {iterations_done}); nothing is profiled")

    def begin(self, iteration: int) -> None:
        if not self.enabled:
            return
        if self.torch_profiler and iteration == self.first - self.warmup:
            self._start_torch_profiler()
        elif not self.torch_profiler and iteration == self.first:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self._capturing = True
        if self._profiler is not None:
            self._range = torch.profiler.record_function(f"iteration {iteration}")
            self._range.__enter__()

    def end(self, iteration: int) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._profiler is not None:
            self._ended = iteration
            self._profiler.step()  # after the last traced step: the trace is written (on_trace_ready)
        if iteration == self.last:
            self.close()

    def close(self) -> None:
        """Stop profiling; a torch profiler still tracing writes what it has (a run stopped inside the window)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.stop()
        if self._capturing:
            self._capturing = False
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self.announce(f"profiled {_iterations(self.first, self.last)} (nsys capture range)")

    def _start_torch_profiler(self) -> None:
        schedule = torch.profiler.schedule(wait=0, warmup=self.warmup, active=self.last - self.first + 1, repeat=1)
        self._profiler = torch.profiler.profile(schedule=schedule, on_trace_ready=self._write_trace,
                                                record_shapes=self.shapes, with_stack=self.stack)
        self._profiler.start()

    def _write_trace(self, profiler) -> None:
        atomic_write_file(self.path, profiler.export_chrome_trace)  # gzip-compressed: the name ends in .gz
        self.announce(f"torch profiler: {_iterations(self.first, self._ended)} traced to {self.path}")


class MemoryHistory:
    """`--record-memory-history`: `start()` before the model is built, `dump()` at every log interval."""

    MAX_ENTRIES = 100_000  # allocation and free events kept (Megatron-LM's number)

    def __init__(self, args: argparse.Namespace, rank: int):
        self.enabled = args.record_memory_history and _profiled_rank(args, rank)
        base, ext = os.path.splitext(args.memory_snapshot_path)
        self.path, self.oom_path = f"{base}_{rank}{ext}", f"{base}_oom_{rank}{ext}"

    def start(self) -> None:
        if not self.enabled:
            return
        # Python stacks only: C++ stacks ("all") make every allocation of a training step unwind the native stack
        torch.cuda.memory._record_memory_history(max_entries=self.MAX_ENTRIES, stacks="python")
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:  # (a private hook of torch's, as Megatron-LM uses it)
            attach(lambda *_: atomic_write_file(self.oom_path, torch.cuda.memory._dump_snapshot))

    def dump(self) -> None:
        if self.enabled:
            atomic_write_file(self.path, torch.cuda.memory._dump_snapshot)
