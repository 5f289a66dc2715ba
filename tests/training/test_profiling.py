"""Megatron-LM's profiling flags (training/profiling.py): which iterations a torch.profiler trace holds (warm-up,
resumed runs, the end of the run, an early stop, the profiled ranks), the trainer writing it without changing the
training, the flags' one-line errors, and on a GPU nsys's capture range and the allocator's memory history."""

from __future__ import annotations

import gzip
import json
import pickle
import re

import pytest
import torch

from training_helpers import losses, pretrain
from megatron_esft.errors import UserError
from megatron_esft.training import profiling
from megatron_esft.training.arguments import build_parser


def _args(*extra: str):
    return build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "6", "--seq-length", "8",
                                      "--lr", "1e-3", *extra])


def _traced_iterations(path) -> tuple[list[int], int]:
    """The `iteration N` ranges of a trace, and how many of torch's ProfilerStep ranges it holds."""
    with gzip.open(path, "rt") as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X"]
    iterations = sorted(int(m.group(1)) for e in events if (m := re.fullmatch(r"iteration (\d+)", e["name"])))
    steps = sum(e["name"].startswith("ProfilerStep#") for e in events)
    return iterations, steps


def _drive(args, iterations, rank=0, done=0, close_after=None):
    """Run `iterations` (as logged) through an IterationProfiler, each with a little work to trace; what it said,
    and whether it had a warm-up step."""
    said = []
    profiler = profiling.IterationProfiler(args, rank, done, announce=said.append)
    for n in iterations:
        profiler.begin(n)
        torch.mm(torch.ones(16, 16), torch.ones(16, 16))
        profiler.end(n)
        if n == close_after:
            break
    profiler.close()
    return said, profiler.warmup


@pytest.mark.parametrize("window, done, close_after, traced, warmup", [
    (("2", "4"), 0, None, [3, 4], 1),  # iteration 2 is the warm-up: traced, then dropped
    (("0", "2"), 0, None, [1, 2], 0),  # no iteration before the window: no warm-up
    (("2", "5"), 3, None, [4, 5], 0),  # resumed after 3: what is left of the window (iteration 3 ran before)
    (("4", "9"), 0, None, [5, 6], 1),  # the run ends at --train-iters 6
    (("0", "4"), 0, 2, [1, 2], 0),  # the run stops after 2 (exit interval, signal): what was traced is written
])
def test_torch_profiler_traces_the_window(tmp_path, window, done, close_after, traced, warmup):
    args = _args("--profile", "--use-pytorch-profiler", "--profile-step-start", window[0], "--profile-step-end",
                 window[1], "--tensorboard-dir", str(tmp_path / "tb"))
    said, warmed_up = _drive(args, range(done + 1, 7), done=done, close_after=close_after)
    assert warmed_up == warmup
    path = tmp_path / "torch_profile" / "rank-0.json.gz"
    # after a stop inside the window, torch's trace also holds the empty step it opened after the last iteration
    assert _traced_iterations(path) == (traced, len(traced) + (close_after is not None))
    assert said == [f"torch profiler: iterations {traced[0]}..{traced[-1]} traced to {path}"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rank-0.json.gz"]  # no temporary file left


def test_only_the_profile_ranks_and_windows_still_ahead_are_profiled(tmp_path):
    ranks = _args("--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "2",
                  "--profile-ranks", "1", "--tensorboard-dir", str(tmp_path / "tb"))
    assert _drive(ranks, range(1, 7), rank=0)[0] == []
    assert not (tmp_path / "torch_profile").exists()
    _drive(ranks, range(1, 7), rank=1)
    assert _traced_iterations(tmp_path / "torch_profile" / "rank-1.json.gz") == ([2], 1)

    passed = _args("--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "3",
                   "--tensorboard-dir", str(tmp_path / "tb2"))
    assert _drive(passed, range(5, 7), done=4)[0] == [
        "--profile: iterations 2..3 were done before this run (it resumes after iteration 4); nothing is profiled"]


def test_trainer_writes_the_trace_and_trains_the_same(training_env, reference):
    tb = training_env["root"] / "profiled" / "tb"
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "3",
                    "--pytorch-profiler-collect-shapes", "--tensorboard-dir", str(tb), data=training_env["data"])
    assert losses(proc) == reference["losses"][:3]
    path = tb.parent / "torch_profile" / "rank-0.json.gz"
    assert f"torch profiler: iterations 2..3 traced to {path}" in proc.stdout
    assert _traced_iterations(path) == ([2, 3], 2)
    with gzip.open(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    # the model's GEMMs, with their shapes (--pytorch-profiler-collect-shapes)
    assert any(e.get("name") == "aten::mm" and e.get("args", {}).get("Input Dims") for e in events)


@pytest.mark.parametrize("extra, world, message", [
    (["--use-pytorch-profiler"], 1, "--use-pytorch-profiler needs --profile"),
    (["--pytorch-profiler-collect-shapes"], 1, "--pytorch-profiler-collect-shapes needs --profile"),
    (["--profile", "--pytorch-profiler-collect-callstack", "--tensorboard-dir", "tb"], 1,
     "--pytorch-profiler-collect-callstack needs --use-pytorch-profiler"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "3",
      "--profile-step-end", "3"], 1, "need 0 <= start < end"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "6"], 1,
     "the run ends at --train-iters 6, so nothing would be profiled"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "1",
      "--profile-ranks", "0", "2"], 2, "--profile-ranks 2: no such rank (world size 2)"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "1"], 1, "give --tensorboard-dir"),
    (["--record-memory-history", "--profile-ranks", "1"], 1, "--profile-ranks 1: no such rank (world size 1)"),
])
def test_bad_profiling_flags(extra, world, message):
    with pytest.raises(UserError, match=re.escape(message)):
        profiling.validate(_args(*extra), world)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the nsys mode works where CUDA is")
def test_nsys_mode_without_a_gpu_is_a_one_line_error(training_env, tmp_path):
    save = tmp_path / "out"
    proc = pretrain(training_env["base"], str(save), "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--profile", "--profile-step-start", "1", check=False, data=training_env["data"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "add --use-pytorch-profiler for a torch.profiler trace" in lines[0], proc.stderr
    assert not save.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_nsys_capture_range_opens_and_closes():
    """Without nsys attached, cudaProfilerStart/Stop succeed and do nothing: the calls and their window are checked."""
    args = _args("--profile", "--profile-step-start", "1", "--profile-step-end", "3")
    assert _drive(args, range(1, 7))[0] == ["profiled iterations 2..3 (nsys capture range)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="memory history works where CUDA is")
def test_memory_history_without_a_gpu_is_an_error():
    with pytest.raises(UserError, match="--record-memory-history records the CUDA caching allocator's history: it "
                                        "needs a GPU"):
        profiling.validate(_args("--record-memory-history"), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_history_snapshots_at_log_intervals_and_on_oom(tmp_path):
    """The snapshot names the test's allocation (its Python stack), and running out of memory writes one too. The
    files are the test's own (torch's snapshot format is a pickle)."""
    args = _args("--record-memory-history", "--memory-snapshot-path", str(tmp_path / "snap.pickle"))
    history = profiling.MemoryHistory(args, rank=0)
    history.start()
    try:
        kept = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        history.dump()
        with pytest.raises(torch.OutOfMemoryError):
            # 1 PiB: over any GPU, and under the 1 EiB that torch refuses before its allocator (and so the OOM
            # observers) runs ("Tried to allocate more than 1EB memory": 1 << 60 gave no snapshot on an H200)
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap_0.pickle", "snap_oom_0.pickle"]
    with open(tmp_path / "snap_0.pickle", "rb") as fh:
        snapshot = pickle.load(fh)
    allocs = [e for trace in snapshot["device_traces"] for e in trace
              if e["action"] == "alloc" and e["size"] == kept.numel()]
    assert any("test_cuda_memory_history" in str(f.get("name")) for e in allocs for f in e["frames"])
