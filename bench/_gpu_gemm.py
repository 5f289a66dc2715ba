"""The `gemm` job of bench/gpu_esft.py: the grouped GEMMs of one routed-experts layer alone, bf16
(`torch._grouped_mm`) against FP8 (torch's `_scaled_grouped_mm` and the Triton kernel of
experts/fp8_triton_gemm.py), on the operands the FP8 experts give them. This measures s, the FP8 GEMMs' speedup on
ESFT's group sizes, which bounds what FP8 experts can gain (docs/gpu.md, the Amdahl bound). One row per GEMM of the
layer's forward and input gradient, then their sum; then the FP8 experts' quantization kernels alone
(bench/_gpu_quantizers.py)."""

from __future__ import annotations

from _gpu_experts import _routed_inputs
from _gpu_quantizers import print_quantizer_tables, time_quantizers
from _gpu_timing import timed

# (name, contraction K, output N) in units of (hidden H, expert ffn F)
_SHAPES = (("fc1 forward", "H", "2F"), ("fc2 forward", "F", "H"), ("fc2 input gradient", "H", "F"),
           ("fc1 input gradient", "2F", "H"))


def _operands(rows, k, n, counts, seed):
    """bf16 rows [M, K] and weights [G, N, K] with their e4m3 quantizations, in the layouts the experts use."""
    import torch

    from megatron_esft.experts.fp8 import quantize_lastdim

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(len(counts), n, k, generator=g) * 0.02).to(dev, torch.bfloat16)
    offs = counts.cumsum(0).to(dev, torch.int32)
    x_q, x_s = quantize_lastdim(x)
    w_q, w_s = quantize_lastdim(w)
    return x, w, offs, (x_q, w_q.transpose(-2, -1), x_s, w_s, offs)


def run_gemm(args, raw):
    import torch

    from megatron_esft.experts import fp8, fp8_triton_gemm

    counts = _routed_inputs(raw, args.tokens, seed=3)[0]
    rows = int(counts.sum())
    size = {"H": raw["hidden_size"], "F": raw["moe_intermediate_size"], "2F": 2 * raw["moe_intermediate_size"]}
    gpu = torch.cuda.is_available()
    results = []
    for name, k_key, n_key in _SHAPES:
        k, n = size[k_key], size[n_key]
        x, w, offs, scaled = _operands(rows, k, n, counts, seed=len(results))
        kernels = {"bf16": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)}
        if gpu and fp8.scaled_grouped_mm_supported(x.device):
            kernels["fp8 torch"] = lambda: torch._scaled_grouped_mm(*scaled[:4], offs=offs, out_dtype=torch.bfloat16,
                                                                    use_fast_accum=True)
        else:  # the CPU emulation: only the script's own smoke test
            kernels["fp8 emulated"] = lambda: fp8._emulated_scaled_grouped_mm(*scaled)
        if fp8_triton_gemm.usable(x):
            kernels["fp8 triton"] = lambda: fp8_triton_gemm.scaled_grouped_mm(*scaled)
        if getattr(args, "candidates", False) and fp8_triton_gemm.usable(x):
            results += _time_candidates(args, name, rows, k, n, len(counts), scaled)
        outputs = {}
        for kernel, call in kernels.items():
            ms, out = timed(call, args)
            if out is None:  # the Triton kernel failed to build (warned): no row
                continue
            outputs[kernel] = out
            results.append({"kind": "gemm", "gemm": name, "kernel": kernel, "rows": rows, "k": k, "n": n,
                            "groups": len(counts), "ms": ms, "tflops": 2 * rows * k * n / ms / 1e9})
            chosen = fp8_triton_gemm.autotuned_config() if kernel == "fp8 triton" else None
            if chosen is not None:  # which candidate won: tiles by pointer or by TMA, and their sizes
                results[-1]["config"] = fp8_triton_gemm.config_label(chosen)
        fp8_ref = next((outputs[key] for key in ("fp8 torch", "fp8 emulated") if key in outputs), None)
        for r in results[-len(outputs):]:  # agreement with torch's FP8 kernel (the same e4m3 operands)
            out = outputs[r["kernel"]]
            r["rel_vs_fp8_torch"] = ((out.float() - fp8_ref.float()).norm() / fp8_ref.float().norm()).item()
        del x, w, scaled, outputs
    return results + time_quantizers(args, raw, rows)


def _time_candidates(args, name, rows, k, n, groups, scaled):
    """One row per autotuning candidate of the Triton kernel (all, or those `args.candidates` names), each launched
    explicitly: which tiles and which loads (pointer or TMA) suit ESFT's groups (the autotuner keeps only its
    winner)."""
    from megatron_esft.experts import fp8_triton_gemm

    out = []
    candidates = fp8_triton_gemm.candidates()
    names = args.candidates if isinstance(args.candidates, list) else candidates  # (bench/_gpu_jobs.py checked them)
    for label in [label for label in candidates if label in names]:
        ms, result = timed(lambda: fp8_triton_gemm.scaled_grouped_mm(*scaled, config=candidates[label]), args)
        if result is None:  # this candidate failed (warned); the kernel is off from here on
            break
        out.append({"kind": "gemm_candidate", "gemm": name, "config": label,
                    "rows": rows, "k": k, "n": n, "groups": groups, "ms": ms, "tflops": 2 * rows * k * n / ms / 1e9})
    return out


def print_candidate_tables(results):
    """Per row count: each Triton candidate's ms per GEMM and the four summed, against bf16's sum."""
    candidates = [r for r in results if r.get("kind") == "gemm_candidate"]
    for rows in sorted({r["rows"] for r in candidates}):
        table = [r for r in candidates if r["rows"] == rows]
        gemms = list(dict.fromkeys(r["gemm"] for r in table))
        bf16 = sum(r["ms"] for r in results if r.get("kind") == "gemm" and r["rows"] == rows
                   and r["kernel"] == "bf16")
        print(f"\n| Triton FP8 candidate ({rows} rows) | " + " | ".join(f"{g} ms" for g in gemms)
              + " | all four ms | speedup vs bf16 |")
        print("|---" * (len(gemms) + 3) + "|")
        for label in dict.fromkeys(r["config"] for r in table):
            ms = {r["gemm"]: r["ms"] for r in table if r["config"] == label}
            total = sum(ms.values()) if len(ms) == len(gemms) else float("nan")
            print(f"| {label} | " + " | ".join(f"{ms[g]:.3f}" if g in ms else "-" for g in gemms)
                  + f" | {total:.3f} | {bf16 / total if bf16 else float('nan'):.2f}x |")


def print_gemm_tables(results):
    """One table per row count: each GEMM's ms, TFLOP/s and speedup over bf16, then the layer's forward + input
    gradient GEMMs summed."""
    gemms = [r for r in results if r.get("kind") == "gemm"]
    for rows in sorted({r["rows"] for r in gemms}):
        table = [r for r in gemms if r["rows"] == rows]
        groups = table[0]["groups"]
        print(f"\n| grouped GEMM ({rows} rows, {groups} groups: {rows // groups} rows per group on average) | kernel | "
              "ms | TFLOP/s | speedup vs bf16 | rel. diff vs torch FP8 | Triton's autotuned candidate |")
        print("|---|---|---|---|---|---|---|")
        bf16 = {r["gemm"]: r["ms"] for r in table if r["kernel"] == "bf16"}
        for r in table:
            print(f"| {r['gemm']} (K {r['k']}, N {r['n']}) | {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                  f"{bf16.get(r['gemm'], float('nan')) / r['ms']:.2f}x | {r['rel_vs_fp8_torch']:.1e} | "
                  f"{r.get('config', '')} |")
        kernels = dict.fromkeys(r["kernel"] for r in table)
        totals = {kernel: sum(r["ms"] for r in table if r["kernel"] == kernel) for kernel in kernels
                  if sum(r["kernel"] == kernel for r in table) == len(_SHAPES)}
        for kernel, ms in totals.items():
            print(f"| all four (forward + input gradient) | {kernel} | {ms:.3f} | "
                  f"{sum(2 * r['rows'] * r['k'] * r['n'] for r in table if r['kernel'] == kernel) / ms / 1e9:.0f} | "
                  f"{totals.get('bf16', float('nan')) / ms:.2f}x | | |")
    print_candidate_tables(results)
    print_quantizer_tables(results)
