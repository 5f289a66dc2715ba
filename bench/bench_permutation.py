"""MoE token permutation: Megatron-Core's unfused permute/unpermute vs the gather permutation (experts/permutation.py).

One step = permute the layer's tokens into expert-sorted rows (with their probabilities), scale the rows (stands in
for the experts), unpermute, backward. Default shapes: one DeepSeek-V2-Lite MoE layer at seq 4096 (4096 tokens,
hidden 2048, 64 experts, top-6: 24,576 rows). Both variants run in one process, interleaved round-robin, median of
`--iters` steps after warm-up (CUDA events on a GPU). On a GPU the host syncs of one step are counted with
`torch.cuda.set_sync_debug_mode`. Run: `python bench/bench_permutation.py [--tokens N] [--dtype bf16|fp32]`.

A second table times the un-permutation's kernel alone: embedding_bag (ours) against gather + sum; a third the
permutation's row gather alone, of bf16 and of e4m3 rows, element-wise against 8-byte words.

`--layer-ffn F` (F > 0) adds a fourth table: the whole routed path of an ESFT layer (permute, frozen-aware grouped
experts with `--trainable` of the experts trainable at spread-out ids, un-permute; fwd+bwd) with the dispatcher's
permutation (Megatron's or the gather) followed by the experts' regroup, against the experts permuting the tokens
themselves ("experts", the default at EP = 1), and the same with the token counts left on the device ("device",
bf16: experts/device_counts.py); `--backend fp8` for FP8 experts (a GPU with cc 9.0/10.0; emulated, and
slow, on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _gpu_timing import Timer, count_host_syncs, sync  # noqa: E402 (bench/ is on sys.path)
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


def sum_pairs_variants(inputs, topk):
    """The un-permutation's kernel alone (each token's k rows summed; also the permutation's backward): what
    experts/permutation.sum_pairs runs (on a GPU the Triton kernel of experts/pair_sum.py, elsewhere embedding_bag),
    torch's embedding_bag, and a gather into a [T*k, H] temporary and a sum over k. On an H200 the embedding_bags of a
    27-layer step took 9.7 ms, ~8x the time their bytes need at full bandwidth."""
    import torch
    import torch.nn.functional as F

    from megatron_esft.experts import pair_sum
    from megatron_esft.experts.permutation import index_range, sum_pairs, topk_permutation

    tokens, _, routing_map, _ = inputs
    _, _, row_of_pair = topk_permutation(routing_map, topk)
    rows = torch.randn(row_of_pair.numel(), tokens.shape[1], generator=torch.Generator().manual_seed(1)).to(tokens)
    offsets = index_range(0, row_of_pair.numel(), topk, row_of_pair.device)
    variants = {"sum_pairs (ours)": lambda: sum_pairs(rows, row_of_pair, topk),
                "embedding_bag": lambda: F.embedding_bag(row_of_pair, rows, offsets, mode="sum"),
                "gather + sum": lambda: rows.index_select(0, row_of_pair).view(-1, topk, rows.shape[1]).sum(dim=1)}
    if pair_sum.usable(rows, row_of_pair, topk):
        variants["Triton pair sum"] = lambda: pair_sum.pair_sum(rows, row_of_pair, topk)
    return variants


def gather_variants(inputs, topk):
    """The permutation's row gather alone (tokens[token_of_row], T*k rows), of the bf16 tokens and of their e4m3
    quantization (the FP8 experts gather e4m3 rows): index_select of the rows' own elements (bytes for e4m3) against
    experts/permutation.gather_rows (8-byte words)."""
    import torch

    from megatron_esft.experts.permutation import gather_rows, topk_permutation

    tokens, _, routing_map, _ = inputs
    token_of_row = topk_permutation(routing_map, topk)[0]
    bf16 = tokens.to(torch.bfloat16)
    e4m3 = bf16.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"bf16 rows, index_select of elements": lambda: bf16.index_select(0, token_of_row),
            "bf16 rows, gather_rows (8-byte words)": lambda: gather_rows(bf16, token_of_row),
            "e4m3 rows, index_select of bytes": lambda: e4m3.index_select(0, token_of_row),
            "e4m3 rows, gather_rows (8-byte words)": lambda: gather_rows(e4m3.view(torch.float8_e4m3fn),
                                                                            token_of_row)}


def build_experts(args, device, dtype):
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_esft.experts import FrozenAwareGroupedExperts
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=args.layer_ffn, use_cpu_initialization=device == "cpu",
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, gradient_accumulation_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16)
    experts = FrozenAwareGroupedExperts(args.experts, config, MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear), get_default_pg_collection())
    stride = max(args.experts // max(args.trainable, 1), 1)
    experts.set_trainable_experts(list(range(1, args.experts, stride))[: args.trainable])
    if args.backend == "fp8":
        experts.set_gemm_backend("fp8", "frozen")
    return experts.to(device)


def layer_step(variant, inputs, topk, experts):
    """Permutation + experts + un-permutation, forward and backward."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megatron_esft.experts.permutation import permute_tokens, unpermute_tokens

    tokens, probs, routing_map, grad = inputs
    x, p = tokens.detach().requires_grad_(), probs.detach().requires_grad_()
    tokens_per_expert = routing_map.sum(dim=0)
    experts.set_token_counts("device" if variant == "device" else "host")
    if variant in ("experts", "device"):  # "experts": the counts on the host, as the dispatcher hands them over
        counts = tokens_per_expert if variant == "device" else tokens_per_expert.cpu()
        out, _ = experts(x, counts, p, routing_map=routing_map)
    elif variant == "gather":
        rows, row_probs, mapping = permute_tokens(x, p, routing_map, topk)
        out = unpermute_tokens(experts(rows, tokens_per_expert, row_probs)[0], mapping)
    else:
        rows, row_probs, order = permute(x, routing_map, probs=p, num_out_tokens=routing_map.shape[0] * topk)
        out = unpermute(experts(rows, tokens_per_expert, row_probs)[0], order, x.shape, routing_map=routing_map)
    out.backward(grad)


def time_variants(variants, run, args):
    timers = {v: Timer() for v in variants}
    for i in range(args.warmup + args.iters):
        for variant in variants:
            if i < args.warmup:
                run(variant)
                sync()
                continue
            with timers[variant]:
                run(variant)
    return {v: t.median_ms() for v, t in timers.items()}


def count_syncs(run):
    """Host syncs of one call of run() (_gpu_timing.count_host_syncs), "-" on CPU."""
    counted = count_host_syncs(run)
    return "-" if counted is None else counted[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--layer-ffn", type=int, default=0, help="also time the ESFT routed layer with this expert ffn "
                   "size (0: skip; DeepSeek-V2-Lite: 1408)")
    p.add_argument("--trainable", type=int, default=6, help="trainable experts in the routed-layer table")
    p.add_argument("--backend", choices=["bf16", "fp8"], default="bf16", help="expert GEMMs in the routed-layer table")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bf16" if args.backend == "fp8" else (args.dtype or ("bf16" if device == "cuda" else "fp32"))
    inputs = make_inputs(args, device)
    variants = ("megatron", "gather")
    ms = time_variants(variants, lambda v: step(v, inputs, args.topk), args)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.tokens} tokens x top-{args.topk} of {args.experts} experts = "
          f"{args.tokens * args.topk} rows, hidden {args.hidden}, {args.dtype}; median of {args.iters}")
    labels = {"megatron": "Megatron permute/unpermute (masked_select, scatter_add, index_add)",
              "gather": "gather permutation (ours)"}
    print_table(["permutation, fwd+bwd", "ms", "speedup", "host syncs / step"],
                [[labels[v], f"{ms[v]:.3f}", f"{ms['megatron'] / ms[v]:.2f}x",
                  count_syncs(lambda v=v: step(v, inputs, args.topk))] for v in variants])
    sums = sum_pairs_variants(inputs, args.topk)
    ms = time_variants(tuple(sums), lambda v: sums[v](), args)
    ref = sums["embedding_bag"]().float()
    print(f"\nun-permutation kernel alone ({args.tokens} tokens x {args.topk} rows summed, {args.dtype})")
    print_table(["sum of each token's k rows", "ms", "speedup", "max abs diff vs embedding_bag"],
                [[v, f"{ms[v]:.3f}", f"{ms['embedding_bag'] / ms[v]:.2f}x",
                  f"{(sums[v]().float() - ref).abs().max().item():.2e}"] for v in sums])
    gathers = gather_variants(inputs, args.topk)
    ms = time_variants(tuple(gathers), lambda v: gathers[v](), args)
    print(f"\nthe permutation's row gather alone ({args.tokens * args.topk} rows of {args.hidden})")
    baseline = {v: next(u for u in gathers if u.split(",")[0] == v.split(",")[0]) for v in gathers}

    def same_bits(v):
        return torch.equal(gathers[v]().view(torch.uint8), gathers[baseline[v]]().view(torch.uint8))

    print_table(["row gather", "ms", "speedup vs its element-wise index_select", "bit-identical"],
                [[v, f"{ms[v]:.3f}", f"{ms[baseline[v]] / ms[v]:.2f}x", same_bits(v)] for v in gathers])
    if args.layer_ffn <= 0:
        return
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    experts = build_experts(args, device, dtype)
    variants = ("megatron", "gather", "experts") + (("device",) if args.backend == "bf16" else ())
    ms = time_variants(variants, lambda v: layer_step(v, inputs, args.topk, experts), args)
    print(f"\nESFT routed layer: {len(experts.trainable_local_experts)} of {args.experts} experts trainable, ffn "
          f"{args.layer_ffn}, {'fp8' if args.backend == 'fp8' else args.dtype} expert GEMMs")
    labels = {"megatron": "Megatron permute + experts' regroup + Megatron unpermute",
              "gather": "gather permutation + experts' regroup + gather unpermute",
              "experts": "experts permute the tokens (regroup folded in)",
              "device": "... with the token counts on the device (--moe-token-counts device)"}
    print_table(["routed layer, fwd+bwd", "ms", "speedup vs gather", "host syncs / step"],
                [[labels[v], f"{ms[v]:.3f}", f"{ms['gather'] / ms[v]:.2f}x",
                  count_syncs(lambda v=v: layer_step(v, inputs, args.topk, experts))] for v in variants])


if __name__ == "__main__":
    main()
