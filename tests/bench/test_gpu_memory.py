"""bench/_gpu_memory.py: the peak of one iteration's allocator history, what was pending at it, and by which
allocation site the memory was held, on hand-made traces in torch's snapshot format."""

from __future__ import annotations

import os
import sys

import pytest

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
