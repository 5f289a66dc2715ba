"""torchrun script (2 ranks, gloo): four saves through one `SaveStrategy(fully_parallel=True,
constant_structure=True)`, Megatron-LM's --ckpt-fully-parallel-save --ckpt-assume-constant-structure, each with new
values, the last two in the background (--async-save: the cached plan through Megatron-Core's async writer). Rank 0 prints, as JSON: whether every iteration loads back with its own values, the strategy's cache state,
the sharding validations asked for, and the bytes each rank wrote per iteration."""

import json
import os
import sys

import torch
import torch.distributed as dist


def _state(tensors: dict, rank: int, world: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {key: (ShardedTensor.from_rank_offsets(key, t, replica_id=rank) if key.startswith("shared")
                  else ShardedTensor.from_rank_offsets(key, t, (0, rank, world), replica_id=0))
            for key, t in tensors.items()}


def _values(iteration: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(iteration)  # replicated tensors: the same on every rank
    values = {f"shared{i}": torch.randn(64 * 1024, generator=gen) for i in range(4)}
    values["own"] = torch.full((1024,), float(100 * iteration + rank))  # this rank's shard
    return values


def main(root: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_esft.checkpoint.mcore_checkpoint import SaveStrategy, iteration_dir, save_checkpoint
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    strategy = SaveStrategy(fully_parallel=True, constant_structure=True)
    validations = []
    original = strategy.next_save

    def recorded():  # which saves ask Megatron-Core to validate the sharding (the first only)
        result = original()
        validations.append(result[1])
        return result

    strategy.next_save = recorded
    queue = AsyncCallsQueue()
    for iteration in range(1, 5):
        save_checkpoint(root, iteration, _state(_values(iteration, rank), rank, world), {}, strategy=strategy,
                        async_queue=queue if iteration > 2 else None)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    loads_back = True
    for iteration in range(1, 5):
        want = _values(iteration, rank)
        empty = {key: torch.empty_like(t) for key, t in want.items()}
        loaded = dist_checkpointing.load(_state(empty, rank, world), iteration_dir(root, iteration))
        loads_back &= all(torch.equal(loaded[key], want[key]) for key in want)
    flags = torch.tensor([int(loads_back)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    wrapper = strategy.megatron_strategy
    base = wrapper.base_strategy
    written = [[sum(os.path.getsize(os.path.join(iteration_dir(root, it), name))
                    for name in os.listdir(iteration_dir(root, it)) if name.startswith(f"__{r}_"))
                for r in range(world)] for it in range(1, 5)]
    if rank == 0:
        print(json.dumps({"loads_back": bool(flags.item()), "validations": validations,
                          "plan_reused": bool(base.use_cached_ckpt_structure and base.validated_cache_reuse),
                          "metadata_cached": base.cached_global_metadata is not None,
                          "distribution_cached": wrapper.cached_distribution is not None,
                          "written": written}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
