"""Who writes a checkpoint's replicated tensors, and how often the writer plans: the first replica writes them
(Megatron-Core's default), every holder in turn (--ckpt-fully-parallel-save, the trainer's default), and the same with
the plan kept from save to save (--ckpt-assume-constant-structure), side by side in one run.

Every rank holds the same `--gib` of fp32 tensors in `--tensors` pieces (replica_id = its rank: the dense weights on
each data-parallel replica) plus a private `--own-gib` (its distributed-optimizer shard);
`mcore_checkpoint.save_checkpoint` writes them, three times each way (the constant-structure writer after its own two
warm-up saves, which make and check its plan). Run it under torchrun (gloo on CPU, nccl on GPUs):

    torchrun --nproc_per_node 2 bench/bench_parallel_save.py [--gib 1.0] [--own-gib 0.1] [--tensors 16] [--dir /tmp]

"max MiB per rank" is what the slowest writer writes; "save s" the wall time of the collective save (median). Many
small tensors (a model has hundreds) make the planning's share of a save visible.
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
    parser.add_argument("--tensors", type=int, default=16, help="pieces the replicated GiB comes in")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_esft.checkpoint.mcore_checkpoint import SaveStrategy, iteration_dir, save_checkpoint
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    per = max(1, round(args.gib * 2**30 / 4 / args.tensors))  # fp32 elements per replicated tensor
    gen = torch.Generator().manual_seed(0)  # the same replicated values on every rank
    shared = [torch.randn(per, generator=gen).to(device) for _ in range(args.tensors)]
    own = [torch.randn(max(1, round(args.own_gib * 2**30 / 4)) // 4 * 4).to(device)]
    root = tempfile.mkdtemp(dir=args.dir) if rank == 0 else None
    box = [root]
    dist.broadcast_object_list(box, src=0)
    root = box[0]
    # the writers, as the trainer makes them (one per run); the constant-structure one keeps its plan between saves
    constant = SaveStrategy(True, constant_structure=True)
    writers = {"first replica writes": lambda: SaveStrategy(False),
               "fully parallel (default)": lambda: SaveStrategy(True),
               "fully parallel + constant structure": lambda: constant}
    results = {name: ([], None) for name in writers}
    iteration = 0
    for strategy in (SaveStrategy(True), constant, constant):  # warm-up; the constant writer plans and checks
        save_checkpoint(root, iteration, _state(shared, own, rank, world), {}, strategy=strategy)
        iteration += 1
    for _ in range(REPEATS):
        for name, writer in writers.items():
            iteration += 1
            dist.barrier()
            t0 = time.perf_counter()
            save_checkpoint(root, iteration, _state(shared, own, rank, world), {}, strategy=writer())
            results[name][0].append(time.perf_counter() - t0)
            results[name] = (results[name][0], _written_mib(iteration_dir(root, iteration), world))
    if rank == 0:
        size = (sum(t.numel() for t in shared) * 4 / 2**30, sum(t.numel() for t in own) * 4 / 2**30)
        base = statistics.median(results["first replica writes"][0])
        rows = []
        for name, (seconds, written) in results.items():
            s = statistics.median(seconds)
            rows.append([name, f"{world}", f"{size[0]:.2f} + {size[1]:.2f} ({len(shared)} + 1 tensors)",
                         ", ".join(f"{w:.0f}" for w in written), f"{max(written):.0f}", f"{s:.2f}", f"{base / s:.2f}x"])
        print_table(["save", "ranks", "GiB replicated + own per rank", "MiB written per rank", "max MiB per rank",
                     "save s (median)", "speed-up"], rows)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
