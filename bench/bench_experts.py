"""Routed-experts compute on CPU: SequentialMLP (all trainable) vs SequentialMLP (ESFT-frozen) vs frozen-aware grouped.

A stack of routed-expert layers shaped like a ~100M-parameter MoE (default: 4 layers x 64 experts x SwiGLU
hidden 512 / ffn 256 = 100.7M expert parameters, 6 of 64 experts trainable per layer), fed with dispatcher-style
permuted tokens (top-6 routing of 1024 tokens). Reports
the minimum forward+backward time (all variants in one process, iterations interleaved round-robin so machine load
hits them alike), the activation bytes autograd saves for backward, the gradient bytes, and the peak RSS of a separate
process per variant; ratios are relative to SequentialMLP(all trainable). Run: `python bench/bench_experts.py [--tokens N] [--iters N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("sequential_all", "sequential_frozen", "grouped_frozen", "grouped_all")
LABELS = {
    "sequential_all": "SequentialMLP, all trainable (FFT)",
    "sequential_frozen": "SequentialMLP, frozen (requires_grad_(False))",
    "grouped_frozen": "grouped frozen-aware (ours)",
    "grouped_all": "grouped, all trainable",
}


def build(args, variant):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_esft.experts import FrozenAwareGroupedExperts

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_grouped_gemm=False, use_cpu_initialization=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, bias_activation_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    grouped = variant.startswith("grouped")
    frozen = variant.endswith("frozen")
    trainable = list(range(0, args.experts, args.experts // args.trainable))[: args.trainable]
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    layers = []
    for _ in range(args.layers):
        if grouped:
            layer = FrozenAwareGroupedExperts(args.experts, config, submodules, get_default_pg_collection())
            layer.set_trainable_experts(trainable if frozen else range(args.experts))
        else:
            layer = SequentialMLP(args.experts, config, submodules, get_default_pg_collection())
            for j, expert in enumerate(layer.local_experts):
                expert.requires_grad_(not frozen or j in trainable)
        layers.append(layer)

    return layers


def make_inputs(args):
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = args.tokens * args.topk
    counts = torch.multinomial(torch.ones(args.experts), rows, replacement=True, generator=gen).bincount(
        minlength=args.experts
    )
    return counts, torch.randn(rows, args.hidden, generator=gen), torch.rand(rows, generator=gen), torch.randn(
        rows, args.hidden, generator=gen
    )


def step(layers, inputs, measure_saved=False) -> int:
    """One forward+backward through the stack; returns the bytes autograd saved (activations only, deduplicated)."""
    import torch

    counts, x0, probs, grad_out = inputs
    for layer in layers:
        for p in layer.parameters():
            p.grad = None
    param_storages = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    x = x0.clone().requires_grad_(True)  # upstream activations require grad, as in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure_saved else _null():
        h = x
        for layer in layers:
            h, _ = layer(h, counts, probs)
    h.backward(grad_out)
    return sum(storages.values())


def _null():
    import contextlib

    return contextlib.nullcontext()


def _init():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)


def peak_rss_of_variant(args) -> dict:
    """In a fresh process: build one variant, run two steps, report peak RSS (ru_maxrss)."""
    _init()
    layers = build(args, args.variant)
    inputs = make_inputs(args)
    step(layers, inputs)
    step(layers, inputs)
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_all(args) -> list[dict]:
    """All variants in one process; iterations interleaved round-robin so machine load hits them alike."""
    import torch

    _init()
    inputs = make_inputs(args)
    stacks = {v: build(args, v) for v in VARIANTS}
    results = {}
    for v, layers in stacks.items():
        saved = step(layers, inputs, measure_saved=True)  # warm-up (and the grouped-GEMM support probe)
        results[v] = {"variant": v, "saved_bytes": saved, "times": [],
                      "params": sum(p.numel() for l in layers for p in l.parameters()),
                      "trainable_params": sum(p.numel() for l in layers for p in l.parameters() if p.requires_grad),
                      "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for l in layers for p in l.parameters()
                                        if p.grad is not None),
                      "threads": torch.get_num_threads()}
    for _ in range(args.iters):
        for v, layers in stacks.items():
            t0 = time.perf_counter()
            step(layers, inputs)
            results[v]["times"].append(time.perf_counter() - t0)
    for r in results.values():
        r["time_s"] = min(r["times"])  # least disturbed by other load on the machine
    return [results[v] for v in VARIANTS]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--trainable", type=int, default=6, help="trainable experts per layer (frozen variants)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(peak_rss_of_variant(args)), flush=True)
        return
    rss = {}
    for variant in VARIANTS:  # before this process creates its process group (the children make their own)
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rss[variant] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    for r in (results := measure_all(args)):
        r.update(rss[r["variant"]])
    base = results[0]
    mib = 1024.0 ** 2
    print(f"experts: {args.layers} layers x {args.experts} experts, hidden {args.hidden}, ffn {args.ffn} (SwiGLU), "
          f"{base['params'] / 1e6:.1f}M expert params; {args.tokens} tokens x top-{args.topk}; "
          f"{args.trainable}/{args.experts} trainable in frozen variants; fp32, {base['threads']} threads")
    print(f"| variant | trainable params | fwd+bwd (s) | vs FFT | saved for bwd (MiB) | vs FFT | grads (MiB) "
          f"| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {LABELS[r['variant']]} | {r['trainable_params'] / 1e6:.1f}M | {r['time_s']:.3f} | "
              f"{r['time_s'] / base['time_s']:.2f}x | {r['saved_bytes'] / mib:.0f} | "
              f"{r['saved_bytes'] / base['saved_bytes']:.2f}x | {r['grad_bytes'] / mib:.0f} | "
              f"{r['peak_rss_bytes'] / mib:.0f} |")


if __name__ == "__main__":
    main()
