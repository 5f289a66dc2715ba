"""Routing-statistics collection overhead: forward-only tokens/s with the collector attached vs a plain forward.

    .venv/bin/python bench/bench_collect.py [--seq-length 512] [--micro-batches 4] [--rounds 7] [--sizes tiny,small]

Both sides run the same `routing.forward.forward_only` loop (Megatron-Core's forward-only schedule) over the same
packed micro-batches (document masks, per-document positions), on a randomly initialised DeepSeek-V2-style model
built by the model provider; one process, CPU. Rounds alternate plain/collect (ABAB...) so machine noise hits both;
the table gives the median of the rounds and the overhead = plain tokens/s / collect tokens/s - 1.
The last two columns time the router hook alone (500 calls on the model's router and shapes) and relate it to the
plain forward: the overhead without the run-to-run noise. Throughput is measured in process CPU time (`time.process_time`, one torch thread by default) as well as wall time:
on a shared machine the wall clock mostly measures the other jobs, CPU time measures the work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _table import print_table  # noqa: E402 (bench/ is on sys.path when run as a script)
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # name: TinySpec fields (DeepSeek-V2 layout: layer 0 dense, MoE with 2 shared experts after it, MLA)
    "tiny": dict(layers=3, hidden=64, experts=8, topk=2, moe_ffn=32, vocab=512, heads=4),
    "small": dict(layers=4, hidden=512, experts=32, topk=6, moe_ffn=256, vocab=4096, heads=8, intermediate=1024,
                  kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
}


table = print_table


def micro_batches(n, seq, vocab, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        # three documents per sample, like packed task data; the last 5% is padding
        real = seq - seq // 20
        cuts = sorted(torch.randint(1, real, (2,), generator=gen).tolist())
        doc = torch.full((seq,), -1, dtype=torch.long)
        pos = torch.zeros(seq, dtype=torch.long)
        for d, (a, b) in enumerate(zip([0, *cuts], [*cuts, real])):
            doc[a:b] = 3 * i + d
            pos[a:b] = torch.arange(b - a)
        pos[real:] = torch.arange(seq - real)
        tokens = torch.randint(3, vocab, (seq,), generator=gen).masked_fill(doc < 0, 2)
        out.append({"tokens": tokens[None], "position_ids": pos[None], "document_ids": doc[None],
                    "valid": (doc >= 0)[None]})
    return out


def bench_size(name, args):
    import torch

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.routing.collector import RoutingStatsCollector
    from megatron_esft.routing.forward import forward_only

    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", **SIZES[name])), source=name)
    torch.manual_seed(0)
    model = build_model(cfg, params_dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    batches = micro_batches(args.micro_batches, args.seq_length, cfg.vocab_size)
    tokens = sum(int(b["valid"].sum()) for b in batches)
    collector = RoutingStatsCollector(model)

    def plain():
        forward_only([model], batches)

    def collect():
        with collector:
            forward_only([model], batches, on_micro_batch=lambda b: collector.set_valid_mask(b["valid"]))

    plain(), collect()  # warm-up
    cpu = {"plain": [], "collect": []}
    wall = {"plain": [], "collect": []}
    for r in range(args.rounds):
        order = (("plain", plain), ("collect", collect)) if r % 2 == 0 else (("collect", collect), ("plain", plain))
        for key, fn in order:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            fn()
            cpu[key].append(time.process_time() - start_cpu)
            wall[key].append(time.perf_counter() - start_wall)
    assert int(collector.num_tokens.max()) == tokens * (args.rounds + 1)  # it really counted every round

    # the hook alone, on this model's real router and shapes (noise-free estimate of the overhead)
    from megatron_esft.routing.collector import find_routers

    router = find_routers(model)[0]
    seq = args.seq_length
    logits = torch.randn(seq, cfg.n_routed_experts)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(cfg.num_experts_per_tok)[1], True)
    hidden = torch.zeros(seq, 1, cfg.hidden_size)
    collector.set_valid_mask(batches[0]["valid"])
    calls = 500
    start = time.process_time()
    for _ in range(calls):
        collector._logits[id(router)] = logits
        collector._on_router_output(router, (hidden, None), {}, (logits, routing_map))
    hook_us = (time.process_time() - start) / calls * 1e6
    plain_ms_per_mb = statistics.median(cpu["plain"]) / len(batches) * 1e3
    hook_share = len(cfg.moe_layers) * hook_us / 1e3 / plain_ms_per_mb

    def tps(times, key):
        return tokens / statistics.median(times[key])

    def overhead(times):
        return f"{(tps(times, 'plain') / tps(times, 'collect') - 1) * 100:+.1f}%"

    return [name, f"{params / 1e6:.2f}M", f"{cfg.n_routed_experts}x top-{cfg.num_experts_per_tok}",
            len(cfg.moe_layers), tokens, f"{tps(cpu, 'plain'):,.0f}", f"{tps(cpu, 'collect'):,.0f}", overhead(cpu),
            f"{tps(wall, 'plain'):,.0f}", f"{tps(wall, 'collect'):,.0f}", overhead(wall),
            f"{hook_us:.0f}", f"{hook_share * 100:.2f}%"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=0)
    rows = [bench_size(name, args) for name in args.sizes.split(",")]
    print(f"\nforward-only, 1 process, CPU ({torch.get_num_threads()} threads), seq {args.seq_length}, "
          f"{args.micro_batches} micro-batches x {args.rounds} rounds (medians)")
    table(["model", "params", "experts", "MoE layers", "tokens/round", "plain tok/CPU-s", "collect tok/CPU-s",
           "overhead (CPU)", "plain tok/s wall", "collect tok/s wall", "overhead (wall)", "hook us/call",
           "hook share"], rows)
    print("hook us/call: CPU time of one router hook on this model's shapes (seq tokens); hook share: MoE layers x "
          "hook time / plain forward time per micro-batch")


if __name__ == "__main__":
    main()
