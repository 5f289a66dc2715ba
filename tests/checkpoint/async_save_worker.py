"""Run as a script (the background writer starts processes, which re-import __main__): an async save keeps the values
of the moment it was scheduled, and publishes the iteration only when the queue finalizes it."""

import json
import os
import sys

import torch


def main(root: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_esft.checkpoint.mcore_checkpoint import TRACKER, iteration_dir, save_checkpoint
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    weight = torch.randn(512, 256)
    before = weight.clone()
    save_checkpoint(root, 1, {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, {"note": "sync"})
    queue, published = AsyncCallsQueue(), []
    save_checkpoint(root, 2, {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, {"note": "async"},
                    async_queue=queue, on_published=lambda: published.append(2))
    weight.add_(1.0)  # the next optimizer step, while the background process writes
    tracker_while_writing = open(os.path.join(root, TRACKER)).read().strip()
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(512, 256), replica_id=0)},
                                     iteration_dir(root, 2))["w"]
    print(json.dumps({"tracker_while_writing": tracker_while_writing, "published": published,
                      "tracker": open(os.path.join(root, TRACKER)).read().strip(),
                      "saved_is_scheduled_value": torch.equal(loaded, before),
                      "leftovers": sorted(n for n in os.listdir(root) if n.startswith("."))}))


if __name__ == "__main__":
    main(sys.argv[1])
