"""Multi-rank routing-statistics runs (run by test_collector_parallel.py; not a test module itself).

    python collect_parallel_main.py reference DIR             # 1 rank: build, save a dist checkpoint, collect
                                                              # (the test calls collect("reference", DIR) in-process)
    torchrun --nproc_per_node 2 collect_parallel_main.py parallel DIR   # DP2, EP2, TP2+SP, TP2 (no SP), PP2
Each run writes DIR/<layout>.json (scores.json content) from rank 0.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {
    "dp2": dict(),
    "ep2": dict(expert_model_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=False),
    "pp2": dict(pipeline_model_parallel_size=2),
}


def collect(layout: str, out_dir: str, **parallel_kwargs) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from routing_tiny_model import build_tiny_moe, micro_batches

    from megatron_esft.parallel import ParallelConfig, initialize, is_rank0
    from megatron_esft.routing.collector import RoutingStatsCollector
    from megatron_esft.routing.forward import forward_only, shard_for_data_parallel_rank

    parallel = ParallelConfig(**parallel_kwargs)
    initialize(parallel, seed=1234)
    model = build_tiny_moe(parallel)
    ckpt = os.path.join(out_dir, "ckpt")
    if layout == "reference":
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    mine = shard_for_data_parallel_rank(micro_batches(), parallel_state.get_data_parallel_rank(),
                                        parallel_state.get_data_parallel_world_size())
    with RoutingStatsCollector(model) as collector:
        forward_only([model], mine, on_micro_batch=lambda b: collector.set_valid_mask(b["valid"]))
    scores = collector.reduce(model={"layout": layout})
    # what each rank did: tokens it counted, layers it owns, local experts -- proves the layout really was parallel
    mine = torch.tensor([collector.local_tokens(), int(collector.owned.sum()),
                         model.decoder.layers[-1].mlp.experts.num_local_experts], dtype=torch.int64)
    ranks = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(ranks, mine)
    scores.data = {"per_rank": [r.tolist() for r in ranks]}
    if is_rank0():
        with open(os.path.join(out_dir, f"{layout}.json"), "w") as handle:
            json.dump(scores.to_json_dict(), handle)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        collect("reference", out)
    else:
        for name, kwargs in LAYOUTS.items():
            collect(name, out, **kwargs)
