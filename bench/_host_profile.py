"""Where the host's time of a training step goes, by module (forward) and by autograd node (backward).

On a GPU kernels run asynchronously, so the host's time in a module is the time to *issue* its work (Python, the
dispatcher, kernel launches). A step whose GPU is idle part of the time (bench/gpu_esft.py --profile: kernel time
against step time; per-phase GPU vs host spans) is bound by that host time; this says which modules spend it and
how many aten ops (each one or more kernel launches) they dispatch. On the CPU the same tables include the kernels'
own compute, so there only the op counts carry over to a GPU.

* forward: module forward pre/post hooks around every module; time and ops are exclusive of child modules (a
  module's own code), summed per module class.
* backward: ops counted per autograd node class (`torch._C._current_autograd_node()` inside the dispatch mode; the
  engine carries the mode to its thread); time from torch.profiler's "autograd::engine::evaluate_function: <node>"
  ranges (inclusive of the ops inside).
* optimizer and anything outside a module: "(outside modules)" of their phase.

Caveat: the counting is a TorchDispatchMode, and a torch.compile'd function called under one runs uncompiled, and
from then on stays so in this process (Dynamo skips its frame for good; training/cuda_graph.py). So the profile counts
the fused SwiGLU's and the chunked loss's eager ops and time, and it runs last in a job, after the timed steps.
"""

from __future__ import annotations

import collections
import contextlib
import time

PHASES = ("forward", "backward", "optimizer")


def _dispatch_counter(counts, label_of, by_op=None, seconds=None):
    """A TorchDispatchMode counting non-view aten ops under `label_of()` (and, in `by_op`, under (label, op name));
    `seconds` adds up the host time spent inside them (on a GPU their launches; on a CPU their compute too)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default):
                label = label_of()
                counts[label] += 1
                if by_op is not None:
                    by_op[(label, func.overloadpacket.__name__)] += 1
                if seconds is not None:
                    t0 = time.perf_counter()
                    out = func(*args, **(kwargs or {}))
                    seconds[label] += time.perf_counter() - t0
                    return out
            return func(*args, **(kwargs or {}))

    return _Count()


@contextlib.contextmanager
def _module_hooks(times):
    import torch

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(times.pre),
               torch.nn.modules.module.register_module_forward_hook(times.post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _ModuleTimes:
    """Global module hooks: exclusive host seconds per module class (a stack of open module calls)."""

    def __init__(self):
        self.stack, self.seconds, self.calls = [], collections.Counter(), collections.Counter()

    def top(self, phase):
        return type(self.stack[-1][0]).__name__ if self.stack else f"(outside modules, {phase})"

    def pre(self, module, *_):
        self.stack.append([module, time.perf_counter(), 0.0])

    def post(self, module, *_):
        if not self.stack or self.stack[-1][0] is not module:
            return None  # a hook added while a module ran, or an exception unwound the stack
        _, t0, children = self.stack.pop()
        elapsed = time.perf_counter() - t0
        self.seconds[type(module).__name__] += elapsed - children
        self.calls[type(module).__name__] += 1
        if self.stack:
            self.stack[-1][2] += elapsed
        return None


def host_profile(forward, backward, optimizer, steps=1, rows=25):
    """Profile `steps` training steps, three times (host time; backward ranges; op counts), given as three callables
    (`forward()` returns what `backward(out)` takes).

    Returns {"phases": {phase: (host ms, ops)}, "forward": [(module class, host ms, ops, calls, ms inside its ops)],
    "backward": [(autograd node, host ms, ops)], "ops": [(aten op, phase: module class or autograd node, calls)]},
    per step, the `rows` largest of each."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from _gpu_timing import sync

    ops, phase_ms, by_op, op_seconds = (collections.Counter() for _ in range(4))
    phase = ["forward"]
    times = _ModuleTimes()

    def label():
        if phase[0] == "backward":
            node = torch._C._current_autograd_node()
            return "bw:" + (type(node).__name__ if node is not None else "(engine)")
        return ("fw:" if phase[0] == "forward" else "opt:") + times.top(phase[0])

    def run_step(time_phases=False):
        out = None
        for phase[0], fn in zip(PHASES, (forward, backward, optimizer)):
            sync()  # an empty queue at the start: waits inside the phase are for its own work only
            t0 = time.perf_counter()
            out = fn() if phase[0] != "backward" else fn(out)
            if time_phases:
                phase_ms[phase[0]] += 1e3 * (time.perf_counter() - t0)  # issuing the phase (no final wait)
            sync()

    # pass 1, host time: module hooks only (a profiler or a dispatch mode would add their own time per op)
    with _module_hooks(times):
        for _ in range(steps):
            run_step(time_phases=True)
    forward_seconds, forward_calls = times.seconds.copy(), times.calls.copy()
    # pass 2, the backward's host time per autograd node: the profiler's CPU ranges
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_step()
    # pass 3, aten ops: the dispatch mode (with the hooks, to know the module)
    times = _ModuleTimes()
    with _module_hooks(times), _dispatch_counter(ops, label, by_op, op_seconds):
        for _ in range(steps):
            run_step()
    backward_ms = collections.Counter()
    for event in prof.key_averages():
        name = event.key
        if name.startswith("autograd::engine::evaluate_function: "):
            node = name.split(": ", 1)[1].removeprefix("torch::autograd::")  # as type(node).__name__ says it
            backward_ms[node] += event.cpu_time_total / 1e3
    per_phase_ops = collections.Counter()
    for key, n in ops.items():
        per_phase_ops[{"fw": "forward", "bw": "backward", "opt": "optimizer"}[key.split(":", 1)[0]]] += n
    forward_rows = sorted(
        ((cls, 1e3 * s / steps, ops.get("fw:" + cls, 0) / steps, forward_calls[cls] / steps,
          1e3 * op_seconds.get("fw:" + cls, 0.0) / steps) for cls, s in forward_seconds.items()),
        key=lambda r: -r[1])
    outside = ops.get("fw:(outside modules, forward)", 0)
    if outside:
        forward_rows.append(("(outside modules)", float("nan"), outside / steps, 0,
                             1e3 * op_seconds["fw:(outside modules, forward)"] / steps))
    nodes = set(k[3:] for k in ops if k.startswith("bw:")) | set(backward_ms)
    backward_rows = sorted(((n, backward_ms.get(n, 0.0) / steps, ops.get("bw:" + n, 0) / steps) for n in nodes),
                           key=lambda r: (-r[1], -r[2]))
    op_rows = sorted(((op, site.replace("fw:", "forward: ").replace("bw:", "backward: ").replace(
        "opt:", "optimizer: "), n / steps) for (site, op), n in by_op.items()), key=lambda r: -r[2])
    return {"phases": {p: (phase_ms[p] / steps, per_phase_ops[p] / steps) for p in PHASES},
            "forward": forward_rows[:rows], "backward": backward_rows[:rows], "ops": op_rows[:rows]}


def format_host_profile(result, top=15) -> str:
    lines = ["| phase | host ms per step | aten ops per step (not views) |", "|---|---|---|"]
    lines += [f"| {p} | {ms:.1f} | {n:.0f} |" for p, (ms, n) in result["phases"].items()]
    # forward rows of results written before the ops' own time was measured have four fields
    lines += ["", "| forward: module class (own code) | host ms | of which in aten ops | aten ops | calls |",
              "|---|---|---|---|---|"]
    lines += [f"| {cls} | {ms:.2f} | {(row + [float('nan')])[0]:.2f} | {n:.0f} | {calls:.0f} |"
              for cls, ms, n, calls, *row in result["forward"][:top]]
    lines += ["", "| backward: autograd node | host ms (incl. its ops) | aten ops |", "|---|---|---|"]
    lines += [f"| {node} | {ms:.2f} | {n:.0f} |" for node, ms, n in result["backward"][:top]]
    if result.get("ops"):  # absent in results written before this table existed
        lines += ["", "| aten op | where | calls per step |", "|---|---|---|"]
        lines += [f"| {op} | {site} | {n:.0f} |" for op, site, n in result["ops"][:top]]
    return "\n".join(lines)
