"""The Markdown tables bench/gpu_esft.py prints from its jobs' results (docs/benchmarks.md quotes them)."""

from __future__ import annotations

import json

from _gpu_gemm import print_gemm_tables


def _fp8_kernels(r) -> str:
    """", Triton GEMMs" / ", Triton quantizers" where an FP8 row ran them (the label of torch's kernels is none)."""
    if r["backend"] != "fp8":
        return ""
    return ((", Triton GEMMs" if r.get("fp8_kernel") == "triton" else "")
            + (", Triton quantizers" if r.get("fp8_quantizer") == "triton" else ""))


def print_tables(results, device):
    print(f"\n## device: {device}")
    checks = [r for r in results if r.get("kind") == "check"]
    if checks:
        print("\n| experts backend | out rel. err vs SequentialMLP | dgrad rel. err | max wgrad rel. err | NaN |")
        print("|---|---|---|---|---|")
        for r in checks:
            print(f"| {r['backend']} | {r['out_rel']:.2e} | {r['dgrad_rel']:.2e} | {r['wgrad_rel_max']:.2e} | {r['nan']} |")
    print_gemm_tables(results)
    for rows in sorted({r["rows"] for r in results if r.get("kind") == "experts"}):  # one table per routed-row count
        exps = [r for r in results if r.get("kind") == "experts" and r["rows"] == rows]
        # speedups within one mode and one input kind (from permuted rows / from tokens, permutation included)
        base = {(r["mode"], r.get("source", "rows")): r["ms"] for r in exps if r["backend"] == "bf16" and r.get("fused", True)}
        print(f"\n| routed experts layer, fwd+bwd ({rows} routed rows) | input | ms | TFLOP/s | "
              "speedup vs bf16 fused SwiGLU, same input |")
        print("|---|---|---|---|---|")
        for r in exps:
            label = (f"{r['mode']} {r['backend']}" + (" fused SwiGLU" if r.get("fused") else "")
                     + (f" (weight cache: {r['cache']})" if r["cache"] else "")
                     + _fp8_kernels(r))
            source = r.get("source", "rows")
            source_label = {"rows": "permuted rows", "tokens": "tokens (experts permute)"}.get(
                source, f"{source} (experts permute)")
            print(f"| {label} | {source_label} | {r['ms']:.2f} | {r['tflops']:.0f} | "
                  f"{base.get((r['mode'], source), float('nan')) / r['ms']:.2f}x |")
    models = [r for r in results if r.get("kind") == "model"]
    if models:
        print("\n| mode | experts | fused kernels | layers | seq x mbs x accum | documents | recompute | ms/iter | tokens/s | "
              "model TFLOP/s | peak GiB (reserved) |"
              " trainable params | frozen bit-identical | loss first->last |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in models:
            exp = r["backend"] + (f" (cache {r['cache']})" if r["backend"] == "fp8" else "")
            exp += _fp8_kernels(r)
            if r.get("token_counts") == "device":
                exp += ", token counts on the device"
            if r.get("cuda_graphs") == "full_iteration":
                exp += ", the whole iteration in a CUDA graph" + ("" if r.get("graph_captured") else " (not captured)")
            elif r.get("cuda_graphs"):
                exp += ", CUDA graphs (Megatron-Core local, per layer)"
            if r.get("manual_gc"):
                exp += ", --manual-gc"
            if r.get("offloaded_gib"):
                exp += f", frozen bf16 weights in host memory ({r['offloaded_gib']:.1f} GiB)"
            if r.get("memory_cap_gib"):
                exp += f", GPU memory capped at {r['memory_cap_gib']} GiB"
            print(f"| {r['mode'].upper()} | {exp} | {r.get('fusions', 'none')} | {r['layers']} | "
                  f"{r['seq']}x{r['mbs']}x{r.get('accum', 1)} | "
                  f"{'mean ' + str(r['doc_len']) + ' tokens' if r.get('doc_len') else 'one (causal)'} | "
                  f"{r['recompute']} | "
                  f"{r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['peak_gib']:.1f} "
                  f"({r.get('reserved_gib', float('nan')):.1f}) | "
                  f"{r['trainable_params'] / 1e9:.2f}B | {r['frozen_bit_identical']} (trainable tensors "
                  f"changed: {r['trainable_changed']}) | {r['loss_first']:.3f}->{r['loss_last']:.3f} |")
    for r in models:
        if r.get("frozen_check_s") is not None and r["mode"] == "esft":  # the trainer's check before every save
            print(f"- {r['mode'].upper()} {r['backend']} {r['layers']} layers: the frozen-weights check (fingerprint "
                  f"of {r['frozen_tensors']} frozen tensors) {r['frozen_check_s'] * 1e3:.0f} ms")
    for r in models:
        if r.get("graph_pool_gib") is not None:  # reserved, not allocated, once the capture freed its activations
            shape = f"{r['seq']}x{r['mbs']}x{r.get('accum', 1)}"
            print(f"- {r['mode'].upper()} {r['backend']} {r['layers']} layers, {shape}: the CUDA graph's memory pool "
                  f"{r['graph_pool_gib']:.1f} GiB")
    for r in models:
        if r.get("memory_trace"):  # "memory_trace": true (bench/_gpu_memory.py)
            from _gpu_memory import format_trace_peak

            shape = f"{r['seq']}x{r['mbs']}x{r.get('accum', 1)}"
            what = "the graph's capture" if r.get("cuda_graphs") == "full_iteration" else "an eager iteration"
            print("\n" + format_trace_peak(f"{r['mode'].upper()} {r['backend']} {r['layers']} layers, {shape}, {what}",
                                            r["memory_trace"]))
    for r in models:
        if r.get("gpu_kernel_ms"):  # --profile: kernel time of one profiled step against the timed step
            print(f"- {r['mode'].upper()} {r['layers']} layers ({r.get('fusions')}): GPU kernels {r['gpu_kernel_ms']:.1f}"
                  f" ms of {r['ms']:.1f} ms per iteration, GPU busy {r['gpu_kernel_ms'] / r['ms']:.0%}")
    for r in models:
        if r.get("phases"):  # GPU-timeline ms (host ms) per phase: equal spans mean the host sets the pace
            spans = ", ".join(f"{name} {gpu:.1f} ({host:.1f})" for name, (gpu, host) in r["phases"].items())
            line = (f"- {r['mode'].upper()} {r['backend']} {r['layers']} layers, {r['seq']}x{r['mbs']}x{r.get('accum', 1)}: "
                    f"GPU ms (host ms) {spans}")
            if r.get("host_syncs"):
                count, sites = r["host_syncs"]
                line += f"; host syncs per step: {count} (" + ", ".join(f"{s} x{n}" for s, n in sites) + ")"
            print(line)
    for r in models:
        if r.get("host_profile"):  # --profile: where the host's time goes (bench/_host_profile.py)
            from _host_profile import format_host_profile

            print(f"\nhost profile, {r['mode'].upper()} {r['backend']} {r['layers']} layers (one step):\n"
                  + format_host_profile(r["host_profile"], top=10))
    for r in results:
        if "error" in r:
            print(f"- {json.dumps(r['job'])}: {r['error']}")
