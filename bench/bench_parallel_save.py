"""Who writes a checkpoint's replicated tensors: the first replica (Megatron-Core's default) or every holder in turn
(--ckpt-fully-parallel-save, the trainer's default), side by side in one run.

Every rank holds the same `--gib` of fp32 tensors (replica_id = its rank: the dense weights on each data-parallel
replica) plus a private `--own-gib` (its distributed-optimizer shard); `mcore_checkpoint.save_checkpoint` writes them,
three times each way. Run it under torchrun (gloo on CPU, nccl on GPUs):

    torchrun --nproc_per_node 2 bench/bench_parallel_save.py [--gib 1.0] [--own-gib 0.1] [--dir /tmp]

"max MiB per rank" is what the slowest writer writes; "save s" the wall time of the collective save (median).
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


def _state(shared, own, rank: int, world: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    state = {f"shared{i}": ShardedTensor.from_rank_offsets(f"shared{i}", t, replica_id=rank)
             for i, t in enumerate(shared)}
    state.update({f"own{i}": ShardedTensor.from_rank_offsets(f"own{i}", t, (0, rank, world), replica_id=0)
                  for i, t in enumerate(own)})
    return state


def _written_mib(directory: str, world: int) -> list[float]:
    return [sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
                if name.startswith(f"__{rank}_") and name.endswith(".distcp")) / 2**20 for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="replicated GiB (every rank holds all of it)")
    parser.add_argument("--own-gib", type=float, default=0.1, help="GiB only this rank holds")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_esft.checkpoint.mcore_checkpoint import iteration_dir, save_checkpoint
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    per = 16 * 2**20  # fp32 elements: 64 MiB tensors
    gen = torch.Generator().manual_seed(0)  # the same replicated values on every rank
    shared = [torch.randn(per, generator=gen).to(device) for _ in range(max(1, round(args.gib * 2**30 / (4 * per))))]
    own = [torch.randn(max(1, round(args.own_gib * 2**30 / 4)) // 4 * 4).to(device)]
    root = tempfile.mkdtemp(dir=args.dir) if rank == 0 else None
    box = [root]
    dist.broadcast_object_list(box, src=0)
    root = box[0]
    results = {False: ([], None), True: ([], None)}
    iteration = 0
    save_checkpoint(root, iteration, _state(shared, own, rank, world), {}, fully_parallel=True)  # warm-up
    for _ in range(REPEATS):
        for fully_parallel in (False, True):
            iteration += 1
            dist.barrier()
            t0 = time.perf_counter()
            save_checkpoint(root, iteration, _state(shared, own, rank, world), {}, fully_parallel=fully_parallel)
            results[fully_parallel][0].append(time.perf_counter() - t0)
            results[fully_parallel] = (results[fully_parallel][0], _written_mib(iteration_dir(root, iteration), world))
    if rank == 0:
        size = (sum(t.numel() for t in shared) * 4 / 2**30, sum(t.numel() for t in own) * 4 / 2**30)
        base = statistics.median(results[False][0])
        rows = []
        for fully_parallel, (seconds, written) in results.items():
            s = statistics.median(seconds)
            rows.append(["fully parallel (default)" if fully_parallel else "first replica writes",
                         f"{world}", f"{size[0]:.2f} + {size[1]:.2f}", ", ".join(f"{w:.0f}" for w in written),
                         f"{max(written):.0f}", f"{s:.2f}", f"{base / s:.2f}x"])
        print_table(["save", "ranks", "GiB replicated + own per rank", "MiB written per rank", "max MiB per rank",
                     "save s (median)", "speed-up"], rows)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
