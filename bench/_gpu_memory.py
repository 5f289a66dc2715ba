"""What holds the GPU's memory at the peak of one iteration (bench/gpu_esft.py's `"memory_trace": true` jobs).

torch's allocator history (`torch.cuda.memory._record_memory_history`, Python stacks only) is recorded over one
iteration, eager or the CUDA graph's capture, and replayed here event by event:
- a block is *held* from its `alloc` until its `free_completed`, the moment the allocator can hand it out again;
- between `free_requested` (the tensor died) and `free_completed` it is *pending*. For a block used on another
  stream as well, torch defers that completion during a capture until the capture ends, so pending memory at the
  capture's peak is memory the capture could not reuse.
The report gives the peak of held memory, how much of it was pending, and the held blocks by allocation site: the
innermost Python frame outside torch's own files. Blocks allocated in autograd's C++ backward have no Python frame.
"""

from __future__ import annotations

import os
import sys

NO_FRAME = "(no Python frame: autograd's backward or C++)"


def allocation_site(frames, skip=(os.sep + "torch" + os.sep, "<frozen ", os.sep + "contextlib.py")) -> str:
    """The innermost frame not in torch's (or the standard library's plumbing) files, as `path:line name`, relative
    to the repository or site-packages when it lies in one."""
    for frame in frames or ():
        name = frame.get("filename", "")
        if not any(part in name for part in skip):
            for anchor in ("site-packages" + os.sep, os.sep + "megatron_esft" + os.sep, os.sep + "bench" + os.sep):
                if anchor in name:
                    name = name[name.index(anchor) + (len(anchor) if anchor.startswith("site") else 1):]
                    break
            return f"{name}:{frame.get('line', '?')} {frame.get('name', '?')}"
    return NO_FRAME


def trace_peak(snapshot: dict, device: int = 0, top: int = 12) -> dict:
    """Peak held bytes over the recorded events, the pending part of it, and the held blocks at the peak grouped by
    allocation site (the `top` largest), all in GiB."""
    events = snapshot["device_traces"][device]
    held = pending = 0
    peak = peak_pending = 0
    peak_at = -1
    live = {}  # addr -> (size, frames, pending)
    for i, event in enumerate(events):
        action, addr = event["action"], event.get("addr")
        if action == "alloc":
            live[addr] = (event["size"], event.get("frames"), False)
            held += event["size"]
        elif action == "free_requested" and addr in live and not live[addr][2]:
            size, frames, _ = live[addr]
            live[addr] = (size, frames, True)
            pending += size
        elif action == "free_completed" and addr in live:
            size, _, was_pending = live.pop(addr)
            held -= size
            pending -= size if was_pending else 0
        if held > peak:
            peak, peak_pending, peak_at = held, pending, i
    # the blocks held at the peak: replay up to it again (one pass keeps no copy of the live set per new peak)
    live = {}
    for event in events[:peak_at + 1]:
        action, addr = event["action"], event.get("addr")
        if action == "alloc":
            live[addr] = (event["size"], event.get("frames"))
        elif action == "free_completed":
            live.pop(addr, None)
    sites = {}
    for size, frames in live.values():
        site = allocation_site(frames)
        total, count = sites.get(site, (0, 0))
        sites[site] = (total + size, count + 1)
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    gib = 2.0**-30
    return {"events": len(events), "peak_gib": peak * gib, "pending_at_peak_gib": peak_pending * gib,
            "blocks_at_peak": len(live),
            "sites": [[site, total * gib, count] for site, (total, count) in ranked[:top]],
            "other_sites_gib": sum(total for _, (total, _) in ranked[top:]) * gib}


def record_iteration(fn):
    """Run fn() with torch's allocator history recorded (Python stacks), then return (fn's result, trace_peak of
    the recorded events); (result, None) without CUDA. If fn fails (say, out of memory under a job's memory cap),
    the table of what was held is printed to stderr (the job's log) before the error goes on."""
    import torch

    if not torch.cuda.is_available():
        return fn(), None
    device = torch.cuda.current_device()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", stacks="python")
    try:
        try:
            result = fn()
        except BaseException:
            trace = trace_peak(torch.cuda.memory._snapshot(), device)
            print(format_trace_peak("the recorded iteration, which failed", trace), file=sys.stderr, flush=True)
            raise
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return result, trace_peak(snapshot, device)


def format_trace_peak(label: str, trace: dict) -> str:
    lines = [f"{label}: {trace['peak_gib']:.2f} GiB held at the peak of the recorded iteration "
             f"({trace['pending_at_peak_gib']:.2f} GiB of it freed but not yet reusable; {trace['blocks_at_peak']} "
             f"blocks, {trace['events']} allocator events)",
             "| allocation site | GiB held at the peak | blocks |", "|---|---|---|"]
    lines += [f"| {site} | {gib:.2f} | {count} |" for site, gib, count in trace["sites"]]
    lines.append(f"| (other sites) | {trace['other_sites_gib']:.2f} | |")
    return "\n".join(lines)
