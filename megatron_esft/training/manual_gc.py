"""Megatron-LM's `--manual-gc`: Python's garbage collector off during training, collections at chosen points only.

Why: a step that is host-bound (the GPU waits for the host to launch its kernels: docs/gpu.md, "Where the time
goes") pays for every automatic collection Python starts inside it, and an automatic gen-2 collection walks every
object the process holds (a model's modules, autograd graphs, the data pipeline). With `--manual-gc` the collector
runs only where nothing waits for it: once before training, every `--manual-gc-interval` iterations (0: never
between steps), and, unless `--no-manual-gc-eval`, before each evaluation (a full collection) and after it (the
youngest generation: what the evaluation made). With several ranks the collections happen at the same iterations
on all of them, so no rank stalls a collective while collecting. Reference counting still frees almost everything
at once; only reference cycles wait for the next collection.
"""

from __future__ import annotations

import argparse
import contextlib
import gc

from megatron_esft.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("garbage collection (Megatron-LM's flags)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collection off while training; collect before training, "
                        "every --manual-gc-interval iterations and around evaluations")
    g.add_argument("--manual-gc-interval", type=int, default=0, metavar="ITERATIONS",
                   help="with --manual-gc: a full collection after every this many iterations (0: none between steps)")
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc: no collections before and after each evaluation")


def validate(args: argparse.Namespace) -> None:
    if args.manual_gc_interval < 0:
        raise UserError(f"--manual-gc-interval {args.manual_gc_interval}: must be at least 0")
    if not args.manual_gc and (args.manual_gc_interval or not args.manual_gc_eval):
        raise UserError(f"{'--manual-gc-interval' if args.manual_gc_interval else '--no-manual-gc-eval'} needs "
                        "--manual-gc")


class ManualGC:
    """`start()` before the training loop, `after_iteration(n)` after each, `with evaluation():` around each
    evaluation, `stop()` at the end (automatic collection back on). No-ops without --manual-gc."""

    def __init__(self, args: argparse.Namespace):
        self.enabled = args.manual_gc
        self.interval = args.manual_gc_interval
        self.around_eval = args.manual_gc_eval
        self._was_enabled = gc.isenabled()

    def describe(self) -> str:
        when = [f"every {self.interval} iterations" if self.interval else None,
                "before and after each evaluation" if self.around_eval else None]
        return ("manual garbage collection: automatic collection off; collecting before training"
                + "".join(f", {w}" for w in when if w))

    def start(self) -> None:
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        collect = self.enabled and self.around_eval
        if collect:
            gc.collect()
        yield
        if collect:
            gc.collect(generation=0)

    def stop(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()
