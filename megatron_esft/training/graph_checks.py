"""What a CUDA graph of the training iteration relies on, checked on eager iterations (a CPU has nothing to capture).

A captured graph replays the kernels of the iteration it recorded, with the arguments and addresses of then. Two
things therefore break it silently or loudly, and both are visible in the aten ops of eager iterations:

* a read of a device value on the host (`.item()`, `.tolist()`, `nonzero`, a `repeat_interleave` without its output
  size, ...): on a GPU the stream waits there, and a capture fails or bakes in the value it read. `HostSyncs`
  counts them. (On a GPU the trainer uses torch's sync debug mode instead: training/cuda_graph.py says why.)
* work that is not the same from one iteration to the next: a Python number that changes per step passed to a
  kernel (a loss scale as a float), a tensor made before the iteration but at another address in every step (a cache
  that rebuilds a tensor), a literal from the host that changes, a data-dependent shape. A replay would use the
  captured step's number, or read memory the eager code no longer uses. `OpTrace` records each aten op of an
  iteration as a capture would see it, and `first_difference` compares two iterations' records.

Both are TorchDispatchModes, so they see autograd's backward too where it runs in the calling thread (CPU tensors).
"""

from __future__ import annotations

import collections
import math
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops whose result the host reads (a device value becomes a Python number or a data-dependent shape): on a GPU
# each waits for the stream, and none can be captured
_READS_ON_HOST = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                           "unique_consecutive", "unique_dim", "is_nonzero", "equal", "allclose"})
# tensors made from host data without a dispatched op (torch.tensor(...)): their values, not their addresses, are what
# a capture records (copied in once)
_LITERALS = frozenset({"lift_fresh", "lift_fresh_copy"})
_LITERAL_MAX_NUMEL = 64  # kept as values (larger literals: a hash of them)
_TORCH_DIR = os.path.dirname(torch.__file__)
_DISTRIBUTED_DIR = os.path.join(_TORCH_DIR, "distributed")
_MODE_HANDLERS = ("__torch_function__", "__torch_dispatch__")  # modes' frames (compat/cpu.py's on a CPU, ours)


class HostSyncs(TorchDispatchMode):
    """Counts what, run on a GPU, would make the stream wait for the host while active: the aten ops above, a
    `repeat_interleave` without its output size, and `.tolist()` / `.numpy()` (which dispatch nothing for a CPU
    tensor: counted by wrapping them while active)."""

    _HOST_READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()
        self._saved = {}
        self._reading = False

    def __enter__(self):
        for name in self._HOST_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self._reading:  # the original may come back here through __torch_function__: one read
                    return _original(tensor, *args, **kwargs)
                self.found[_name] += 1
                self._reading = True
                try:
                    return _original(tensor, *args, **kwargs)
                finally:
                    self._reading = False

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _READS_ON_HOST or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                      and isinstance(args[min(1, len(args) - 1)], torch.Tensor)):
            self.found[name] += 1  # (repeat_interleave: its output size is the sum of a tensor of repeats)
        return func(*args, **kwargs)

    def describe(self) -> str:
        return ", ".join(f"{name} x{n}" for name, n in sorted(self.found.items()))


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() or None  # 0: no memory (an empty tensor)
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, a subclass)
        return None


def _caller() -> tuple[tuple[str, int], bool]:
    """The line of code that ran the op (the innermost frame outside torch, the dispatch modes and contextlib), and
    whether torch.distributed's code is between it and the op."""
    frame, communication = sys._getframe(2), False
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_name in _MODE_HANDLERS
                                 or os.path.basename(frame.f_code.co_filename) == "contextlib.py"):
        communication = communication or frame.f_code.co_filename.startswith(_DISTRIBUTED_DIR)
        frame = frame.f_back
    return ((frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)), communication


class _Tensor(tuple):
    """How OpTrace describes a tensor argument: ("made" | "from before" | "literal", layout, ...)."""


class OpTrace(TorchDispatchMode):
    """The aten ops run while active, each as `(op, its arguments)` plus the line of code that ran it. A tensor
    argument is described by its layout and by where it comes from: made by an earlier op of the same trace (its
    address is the capture's business), or from before the trace (then its address is part of the record: a graph
    reads it there), or a small host literal (its values). Buffers a communication backend allocates without an op
    count as made (torch.distributed's code is between the op and its caller)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.where: list[tuple[str, int]] = []
        self._made: set[int] = set()  # storages an op of the trace allocated (any other one is from before it)
        self._before: set[int] = set()  # storages read as from before the trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        literal = func.__name__.split(".")[0] in _LITERALS
        where, communication = _caller()
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)} - {None}
        if communication:  # a communication backend's own buffers (gloo's coalesced all-reduce flattens the
            # buckets into one it allocated without an op, and splits it back after): made in this iteration
            self._made.update(inputs - self._before)
        record = (str(func), tuple(self._describe(a, literal) for a in args),
                  tuple((k, self._describe(v, literal)) for k, v in sorted(kwargs.items())))
        # outputs that alias no input are new allocations (maybe where a tensor from before the trace was freed); a
        # literal's output is its input, made on the host in this iteration
        if literal:
            inputs = set()
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (ptr := _storage(t)) is not None and ptr not in inputs:
                self._made.add(ptr)
        self.ops.append(record)
        self.where.append(where)
        return out

    def _describe(self, value, literal: bool = False):
        if isinstance(value, torch.Tensor):
            layout = (tuple(value.shape), value.stride(), str(value.dtype), value.device.type)
            ptr = _storage(value)
            if literal:  # (TensorBase's tolist: HostSyncs counts Tensor's)
                values = tuple(torch._C.TensorBase.tolist(value.detach().reshape(-1)))
                return _Tensor(("literal", layout, values if len(values) <= _LITERAL_MAX_NUMEL else hash(values)))
            if ptr is None or ptr in self._made:
                return _Tensor(("made", layout))
            self._before.add(ptr)
            return _Tensor(("from before", layout, ptr, value.storage_offset()))
        if isinstance(value, (list, tuple)):
            return tuple(self._describe(v, literal) for v in value)
        if value is None or isinstance(value, (bool, int, float, complex, str)):
            return value
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(value)
        return type(value).__name__  # a process group, a reduce op, ...: made per call, the same for a replay


def _show(value) -> str:
    if not isinstance(value, _Tensor):
        return repr(value)
    kind, (shape, _, dtype, _), *rest = value
    if kind == "from before":
        return f"a tensor from before the iteration at {rest[0]:#x}+{rest[1]}"
    if kind == "literal":
        values = list(rest[0]) if isinstance(rest[0], tuple) else f"of {math.prod(shape)} values"
        return f"the host literal {values} ({dtype})"
    return f"a tensor {list(shape)} {dtype}"


def _difference(name: str, x, y) -> str | None:
    """The first place where two descriptions of an argument differ (into lists of arguments), or None."""
    if x == y:
        return None
    if type(x) is tuple and type(y) is tuple and len(x) == len(y) and any(isinstance(u, _Tensor) for u in x):
        # a list of tensors: which one (a list of numbers is shown whole)
        return next(d for i, (u, v) in enumerate(zip(x, y)) if (d := _difference(f"{name}[{i}]", u, v)))
    return f"{name}: {_show(x)} -> {_show(y)}"


def _named_arguments(record: tuple) -> list[tuple[str, object]]:
    _, args, kwargs = record
    return [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"argument {k}", v) for k, v in kwargs]


def _argument_difference(a: tuple, b: tuple) -> str:
    named_a, named_b = _named_arguments(a), _named_arguments(b)
    if len(named_a) == len(named_b):
        for (name, x), (_, y) in zip(named_a, named_b):
            if (difference := _difference(name, x, y)) is not None:
                return difference
    return f"arguments {len(named_a)} -> {len(named_b)}"


def first_difference(a: OpTrace, b: OpTrace) -> str | None:
    """Where iteration `b` stops doing what iteration `a` did (op, line of code, argument), or None."""
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        if x != y:
            file, line = b.where[i]
            what = (f"{x[0]} -> {y[0]}" if x[0] != y[0] else f"{y[0]}, {_argument_difference(x, y)}")
            return f"op {i + 1} of {len(b.ops)}, at {os.path.relpath(file)}:{line}: {what}"
    if len(a.ops) != len(b.ops):
        return f"{len(a.ops)} ops -> {len(b.ops)} ops"
    return None
