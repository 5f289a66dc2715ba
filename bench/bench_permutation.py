"""MoE token permutation: Megatron-Core's unfused permute/unpermute vs the gather permutation (experts/permutation.py).

One step = permute the layer's tokens into expert-sorted rows (with their probabilities), scale the rows (stands in
for the experts), unpermute, backward. Default shapes: one DeepSeek-V2-Lite MoE layer at seq 4096 (4096 tokens,
hidden 2048, 64 experts, top-6: 24,576 rows). Both variants run in one process, interleaved round-robin, median of
`--iters` steps after warm-up (CUDA events on a GPU). On a GPU the host syncs of one step are counted with
`torch.cuda.set_sync_debug_mode`. Run: `python bench/bench_permutation.py [--tokens N] [--dtype bf16|fp32]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _gpu_timing import Timer, sync  # noqa: E402 (bench/ is on sys.path)
from _table import print_table  # noqa: E402


def make_inputs(args, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(args.tokens, args.experts, generator=gen)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(args.topk, dim=1).indices, True)
    probs = torch.softmax(scores, dim=-1) * routing_map
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tokens = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
    return [t.to(device) for t in (tokens, probs, routing_map, grad)]


def step(variant, inputs, topk):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megatron_esft.experts.permutation import permute_tokens, unpermute_tokens

    tokens, probs, routing_map, grad = inputs
    x, p = tokens.detach().requires_grad_(), probs.detach().requires_grad_()
    if variant == "gather":
        rows, row_probs, mapping = permute_tokens(x, p, routing_map, topk)
        out = unpermute_tokens(rows * row_probs.unsqueeze(-1).to(rows.dtype), mapping)
    else:
        rows, row_probs, order = permute(x, routing_map, probs=p, num_out_tokens=routing_map.shape[0] * topk)
        out = unpermute(rows * row_probs.unsqueeze(-1).to(rows.dtype), order, x.shape, routing_map=routing_map)
    out.backward(grad)


def count_syncs(variant, inputs, topk):
    """Host syncs of one step (GPU only: torch warns on each synchronizing call in sync debug mode)."""
    import torch

    if not torch.cuda.is_available():
        return "-"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(variant, inputs, topk)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    inputs = make_inputs(args, device)
    variants = ("megatron", "gather")
    timers = {v: Timer() for v in variants}
    for i in range(args.warmup + args.iters):
        for variant in variants:
            if i < args.warmup:
                step(variant, inputs, args.topk)
                sync()
                continue
            with timers[variant]:
                step(variant, inputs, args.topk)
    base = timers["megatron"].median_ms()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.tokens} tokens x top-{args.topk} of {args.experts} experts = "
          f"{args.tokens * args.topk} rows, hidden {args.hidden}, {args.dtype}; median of {args.iters}")
    labels = {"megatron": "Megatron permute/unpermute (masked_select, scatter_add, index_add)",
              "gather": "gather permutation (ours)"}
    print_table(["permutation, fwd+bwd", "ms", "speedup", "host syncs / step"],
                [[labels[v], f"{timers[v].median_ms():.3f}", f"{base / timers[v].median_ms():.2f}x",
                  count_syncs(v, inputs, args.topk)] for v in variants])


if __name__ == "__main__":
    main()
