"""Timing and profiling helpers of bench/gpu_esft.py (CUDA events on a GPU, perf_counter on CPU)."""

from __future__ import annotations

import os
import statistics
import sys
import time


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """CUDA events on GPU (perf_counter on CPU); `median_ms` of the recorded intervals."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.spans = []

    def __enter__(self):
        import torch

        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.spans.append(self.start.elapsed_time(self.end))
        else:
            self.spans.append(1e3 * (time.perf_counter() - self.t0))

    def median_ms(self):
        return statistics.median(self.spans)


class PhaseTimer:
    """Where an iteration's time goes, per phase (forward, backward, optimizer): the GPU timeline's span between
    marks (CUDA events: kernels and the idle gaps between them) next to the host's (perf_counter: issuing the work,
    waits at host syncs included). A phase whose GPU span is about its host span is bound by the host: the GPU runs
    what the host issues as fast as it comes. `mark(name)` ends the phase `name`; phases repeat with gradient
    accumulation and add up per iteration; medians over the recorded iterations."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.marks, self.iterations = None, []

    def _now(self):
        import torch

        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return event, time.perf_counter()

    def start(self, record: bool):
        self.marks = [(None, *self._now())] if record else None

    def mark(self, name: str):
        if self.marks is not None:
            self.marks.append((name, *self._now()))

    def finish(self):
        """After the iteration's end was synchronized (Timer.__exit__): every event has completed."""
        if not self.marks:
            return
        totals = {}
        for (_, e0, t0), (name, e1, t1) in zip(self.marks, self.marks[1:]):
            gpu = e0.elapsed_time(e1) if self.cuda else 1e3 * (t1 - t0)
            gpu_total, host_total = totals.get(name, (0.0, 0.0))
            totals[name] = (gpu_total + gpu, host_total + 1e3 * (t1 - t0))
        self.iterations.append(totals)
        self.marks = None

    def medians(self) -> dict:
        """{phase: [GPU-timeline ms, host ms]}, medians over the iterations."""
        names = self.iterations[0].keys() if self.iterations else ()
        return {n: [statistics.median(it[n][i] for it in self.iterations) for i in (0, 1)] for n in names}


def count_host_syncs(fn):
    """Host synchronizations in one call of fn, with torch's sync debug mode ("warn": every synchronizing CUDA
    call warns, from the Python line that made it): (count, [(site, count)] of the five most frequent). Only the
    Python thread's calls: autograd's backward thread warns on its own (stderr). None on CPU (nothing runs)."""
    import collections
    import warnings

    import torch

    if not torch.cuda.is_available():
        return None
    sites = collections.Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return sum(sites.values()), sites.most_common(5)


def peak_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def peak_reserved_gib():
    """Peak memory the caching allocator held (allocated plus its free blocks): what has to fit on the GPU."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")


# (kind, pattern over GPU kernel names, or aten op names on CPU): the first match wins
_KERNEL_KINDS = [
    ("FP8 grouped GEMM", r"scaled_grouped|f8f8|e4m3"),
    ("grouped GEMM", r"grouped|GroupProblemShape|PtrArray"),  # torch._grouped_mm's CUTLASS kernels
    ("attention", r"flash|fmha|attention|cudnn|sdpa"),
    ("dense GEMM", r"gemm|nvjet|cutlass|xmma|aten::(mm|addmm|bmm|matmul)$"),
    ("fused (Triton / compiled)", r"^triton|fused|compiled"),
    ("permutation / indexing", r"index|scatter|gather|sort|masked|nonzero|unique|repeat_interleave"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copies / cat / fill", r"copy|cat|memcpy|memset|fill|zero"),
    ("reductions / norms / softmax", r"reduce|norm|softmax|sum|mean|max|amax"),
    ("elementwise", r"elementwise|vectorized|pointwise|mul|add|silu|sigmoid|exp|div|sub|neg|pow|rsqrt|where|clamp"),
]


def kernel_time_by_kind(averages, cuda: bool):
    """[(kind, ms, share)] of the self device time of GPU kernels (self CPU time of aten ops on CPU), plus the
    five biggest unclassified names (to refine the patterns)."""
    import re

    from torch.autograd import DeviceType

    totals, other = {}, {}
    for event in averages:
        if getattr(event, "is_user_annotation", False):
            continue  # record_function ranges (e.g. "Optimizer.step#AdamW.step") span kernels counted on their own
        if cuda:
            # kernels only: an aten op's own "self device time" is the time of the kernels it launched, which the
            # kernel events count already (summing both counted every kernel twice: 316 ms of kernels in a 248 ms step)
            if event.device_type != DeviceType.CUDA:
                continue
            ms = event.self_device_time_total / 1e3
        elif event.key.startswith("aten::"):
            ms = event.self_cpu_time_total / 1e3
        else:
            continue
        if ms <= 0:
            continue
        kind = next((k for k, pattern in _KERNEL_KINDS if re.search(pattern, event.key, re.I)), "other")
        totals[kind] = totals.get(kind, 0.0) + ms
        if kind == "other":
            other[event.key] = other.get(event.key, 0.0) + ms
    whole = sum(totals.values()) or 1.0
    rows = sorted(((k, ms, ms / whole) for k, ms in totals.items()), key=lambda r: -r[1])
    return rows, sorted(other.items(), key=lambda kv: -kv[1])[:5]


def profile_kernels(label, fn, steps=2):
    """torch.profiler table of the GPU kernels of `steps` calls of fn, and their time by kind (--profile); returns
    the kernel time per call in ms (against the timed step: how busy the GPU is, i.e. launch and sync gaps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=22, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
    kinds, other = kernel_time_by_kind(averages, cuda)
    lines = [f"| {'GPU kernels' if cuda else 'CPU aten ops'} by kind | ms | share |", "|---|---|---|"]
    lines += [f"| {kind} | {ms:.2f} | {share:.1%} |" for kind, ms, share in kinds]
    lines.append("largest unclassified: " + ", ".join(f"{name} ({ms:.2f} ms)" for name, ms in other))
    print(f"PROFILE {label} ({steps} steps)\n{table}\n" + "\n".join(lines), file=sys.stderr, flush=True)
    return sum(ms for _, ms, _ in kinds) / steps


def timed(call, args):
    """(median ms of `args.iters` calls after `args.warmup` untimed ones, the last call's result)."""
    timer, result = Timer(), None
    for it in range(args.warmup + args.iters):
        with (timer if it >= args.warmup else NullCtx()):
            result = call()
    return timer.median_ms(), result


class NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

