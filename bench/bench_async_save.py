"""How long a checkpoint save blocks training: synchronous vs --async-save (megatron_esft's checkpoint writer).

Saves a state of random fp32 tensors (default 1 GiB, in 64 MiB tensors) with `mcore_checkpoint.save_checkpoint`,
three times each way, side by side in one run: synchronously, and through Megatron-Core's `AsyncCallsQueue` (the
call returns after staging; a forked process writes). "blocking" is what the training loop waits for; "until
published" is until the iteration is renamed into place (the queue finalized). Single process (gloo), CPU tensors: on a
GPU the staging is a device-to-host copy instead.

    python bench/bench_async_save.py [--gib 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _table import print_table  # noqa: E402

REPEATS = 3


def _state(tensors):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", t, replica_id=0) for i, t in enumerate(tensors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import torch
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_esft.checkpoint.mcore_checkpoint import save_checkpoint
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    per = 16 * 2**20  # fp32 elements: 64 MiB tensors
    tensors = [torch.randn(per) for _ in range(max(1, round(args.gib * 2**30 / (4 * per))))]
    size_gib = sum(t.numel() * 4 for t in tensors) / 2**30
    results = {"sync": ([], []), "async": ([], [])}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        queue = AsyncCallsQueue()
        save_checkpoint(root, 0, _state(tensors), {}, async_queue=queue)  # warm-up: the writer's helper processes
        queue.maybe_finalize_async_calls(blocking=True)
        iteration = 1
        for _ in range(REPEATS):
            for mode in ("sync", "async"):
                t0 = time.perf_counter()
                save_checkpoint(root, iteration, _state(tensors), {}, async_queue=queue if mode == "async" else None)
                blocking = time.perf_counter() - t0
                queue.maybe_finalize_async_calls(blocking=True)
                results[mode][0].append(blocking)
                results[mode][1].append(time.perf_counter() - t0)
                iteration += 1
        queue.close()
    rows = []
    sync_blocking = statistics.median(results["sync"][0])
    for mode, (blocking, total) in results.items():
        b = statistics.median(blocking)
        rows.append([mode, f"{size_gib:.2f}", f"{b:.2f}", f"{statistics.median(total):.2f}",
                     f"{sync_blocking / b:.1f}x"])
    print_table(["save", "GiB", "blocking s (median)", "until published s", "less blocking than sync"], rows)


if __name__ == "__main__":
    main()
