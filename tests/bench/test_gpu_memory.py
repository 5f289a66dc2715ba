"""bench/_gpu_memory.py: the peak of one iteration's allocator history, what was pending at it, and by which
allocation site the memory was held, on hand-made traces in torch's snapshot format (and, on a GPU, on torch's
own history)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.conftest import REPO

GIB = 2**30


@pytest.fixture(scope="module")
def gpu_memory():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _gpu_memory

        yield _gpu_memory
    finally:
        sys.path.remove(str(REPO / "bench"))


def frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


TORCH = os.sep.join(["", "venv", "lib", "site-packages", "torch", "nn", "modules", "module.py"])
LAYER = os.sep.join(["", "repo", "megatron_esft", "experts", "grouped.py"])
MCORE = os.sep.join(["", "venv", "lib", "site-packages", "megatron", "core", "transformer", "attention.py"])


def alloc(addr, gib, *frames):
    return {"action": "alloc", "addr": addr, "size": int(gib * GIB), "frames": list(frames)}


def free(addr, completed=True):
    return [{"action": "free_requested", "addr": addr}] + ([{"action": "free_completed", "addr": addr}]
                                                           if completed else [])


def test_the_peak_counts_pending_frees_and_names_the_sites(gpu_memory):
    experts = frame(LAYER, 120, "forward")
    attention = frame(MCORE, 300, "forward")
    events = [
        {"action": "free_completed", "addr": 999},  # a block from before the recording: not this iteration's
        alloc(1, 2.0, frame(TORCH, 10, "_call_impl"), experts),  # torch's own frame skipped: the experts' line
        alloc(2, 1.0, attention),
        *free(2, completed=False),  # died, but its memory is not reusable yet (deferred during a capture)
        alloc(3, 1.5),  # no Python frame (autograd's backward)
        # the peak: 2.0 + 1.0 (pending) + 1.5 = 4.5 GiB
        {"action": "free_completed", "addr": 2},
        *free(1),
        alloc(4, 0.5, experts),
    ]
    trace = gpu_memory.trace_peak({"device_traces": [events]}, device=0, top=2)
    assert trace["peak_gib"] == pytest.approx(4.5) and trace["pending_at_peak_gib"] == pytest.approx(1.0)
    assert trace["blocks_at_peak"] == 3 and trace["events"] == len(events)
    assert trace["sites"] == [[os.sep.join(["megatron_esft", "experts", "grouped.py"]) + ":120 forward", 2.0, 1],
                              [gpu_memory.NO_FRAME, 1.5, 1]]
    assert trace["other_sites_gib"] == pytest.approx(1.0)  # the attention block, past the top 2
    table = gpu_memory.format_trace_peak("ESFT bf16 27 layers", trace)
    assert "4.50 GiB held at the peak" in table and "1.00 GiB of it freed but not yet reusable" in table
    assert "| megatron_esft" in table and "| (other sites) | 1.00 |" in table


def test_a_block_freed_at_once_is_never_pending(gpu_memory):
    events = [alloc(1, 1.0), *free(1), alloc(2, 3.0, frame(MCORE, 7, "f")), *free(2)]
    trace = gpu_memory.trace_peak({"device_traces": [[], events]}, device=1)
    assert trace["peak_gib"] == pytest.approx(3.0) and trace["pending_at_peak_gib"] == 0
    site = os.sep.join(["megatron", "core", "transformer", "attention.py"]) + ":7 f"
    assert trace["sites"] == [[site, 3.0, 1]]


def _held_and_freed():
    """Holds 64 MiB (returned) and frees 32 MiB on the way: the peak is 96 MiB, 64 MiB of it from this line."""
    kept = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # the line the site must name
    temporary = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    del temporary
    return kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's allocator history is CUDA's")
def test_cuda_record_iteration_reads_torchs_own_history(gpu_memory):
    """The real snapshot format: event names, frames innermost first (the site is this file's line, not torch's or
    the caller's), and the peak of what one call allocated."""
    kept, trace = gpu_memory.record_iteration(_held_and_freed)
    assert kept.numel() == 64 << 20
    assert trace["peak_gib"] * GIB == pytest.approx(96 << 20, rel=0.05) and trace["pending_at_peak_gib"] == 0
    site, gib, count = trace["sites"][0]
    line = _held_and_freed.__code__.co_firstlineno + 2
    assert site.endswith(f"test_gpu_memory.py:{line} _held_and_freed") and gib * GIB == pytest.approx(64 << 20)
