"""Part of bench/gpu_esft.py's `gemm` job: the FP8 experts' quantization kernels alone, at one routed-experts
layer's shapes, with the bandwidth they reach against a plain copy of the same bytes on the same device. Why: on the
H200 the FP8 experts layer carried ~1.2 ms more non-GEMM work than the bf16 one at 49,152 rows (docs/gpu.md), while
by bytes its quantizers move no more than bf16's SwiGLU kernels; a quantizer far below the copy's bandwidth is where
that time goes. Each quantizer is timed twice: torch.compile's kernel (the default) and the hand-written Triton one
(experts/fp8_triton_quantize.py: each row read once; the weights' transposed layout read along K, stored along N)."""

from __future__ import annotations

from _gpu_timing import timed

TRAINABLE = 6  # trainable experts per MoE layer in the benchmark's ESFT (their weights are re-quantized per call)


def time_quantizers(args, raw, rows):
    """One row per quantization kernel of an FP8 experts layer (`rows` routed rows, `args.tokens` tokens): ms, the
    bytes it must move, GB/s, and the GB/s of a device copy of as many bytes."""
    import torch

    from megatron_esft.experts import fp8_triton_quantize as hand_written
    from megatron_esft.experts.fp8 import FP8WeightCache, quantize_lastdim
    from megatron_esft.experts.fp8_swiglu import swiglu_backward_quantize, swiglu_quantize

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    h_size, ffn, tokens = raw["hidden_size"], raw["moe_intermediate_size"], args.tokens

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    x, h, da, probs = rand(tokens, h_size), rand(rows, 2 * ffn), rand(rows, ffn), rand(rows, 1, dtype=torch.float32)
    fc1, fc2 = rand(TRAINABLE, 2 * ffn, h_size) * 0.02, rand(TRAINABLE, h_size, ffn) * 0.02
    cache = FP8WeightCache("none")
    weights = fc1.numel() + fc2.numel()
    # (name, compiled call, hand-written call or None, bytes read, bytes written) with bf16 inputs, e4m3 outputs,
    # fp32 scales and probabilities; the compiled calls as the experts make them (the process's quantizer setting is
    # the default, torch.compile's kernels: eager on a CPU)
    kernels = [
        ("tokens (or output gradient) [T, H]", lambda: quantize_lastdim(x),
         lambda: hand_written.quantize_rows(x), 2 * x.numel(), x.numel() + 4 * tokens),
        ("SwiGLU + quantize, forward [rows, 2F] -> [rows, F]", lambda: swiglu_quantize(h, probs),
         lambda: hand_written.swiglu_quantize(h, probs), 2 * h.numel() + 4 * rows, da.numel() + 4 * rows),
        ("SwiGLU backward + quantize [rows, F], [rows, 2F] -> [rows, 2F]",
         lambda: swiglu_backward_quantize(da, h, probs),
         lambda: hand_written.swiglu_backward_quantize(da, h, probs), 2 * (da.numel() + h.numel()) + 4 * rows,
         h.numel() + 8 * rows),
        (f"{TRAINABLE} trainable experts' weights, forward layout", lambda: (cache.quantize(fc1, "nk", dev),
                                                                             cache.quantize(fc2, "nk", dev)),
         lambda: _both(hand_written.quantize_lastdim(fc1), hand_written.quantize_lastdim(fc2)),
         2 * weights, weights),
        (f"{TRAINABLE} trainable experts' weights, input-gradient layout (transposed)",
         lambda: (cache.quantize(fc1, "kn", dev), cache.quantize(fc2, "kn", dev)),
         lambda: _both(hand_written.quantize_columns(fc1), hand_written.quantize_columns(fc2)),
         2 * weights, weights),
    ]
    results = []
    for name, compiled, triton, read, written in kernels:
        source = torch.empty(read // 2, dtype=torch.bfloat16, device=dev)  # a copy moving read + read bytes
        copy_ms = timed(source.clone, args)[0]
        runs = [("torch.compile", compiled)]
        if triton is not None and triton() is not None:  # None: the hand-written kernel does not run here
            runs.append(("hand-written Triton", triton))
        for implementation, call in runs:
            ms = timed(call, args)[0]
            results.append({"kind": "quantizer", "quantizer": name, "implementation": implementation, "rows": rows,
                            "ms": ms, "bytes": read + written, "gbps": (read + written) / ms / 1e6,
                            "copy_gbps": 2 * read / copy_ms / 1e6})
    return results


def _both(a, b):
    """Two hand-written quantizations, or None if either did not run."""
    return None if a is None or b is None else (a, b)


def print_quantizer_tables(results):
    for rows in sorted({r["rows"] for r in results if r.get("kind") == "quantizer"}):
        print(f"\n| FP8 quantization kernel ({rows} routed rows) | kernel | ms | MB moved | GB/s | a copy's GB/s | "
              "share of a copy's | speedup vs torch.compile |")
        print("|---|---|---|---|---|---|---|---|")
        compiled = {r["quantizer"]: r["ms"] for r in results if r.get("kind") == "quantizer" and r["rows"] == rows
                    and r.get("implementation", "torch.compile") == "torch.compile"}
        for r in results:
            if r.get("kind") == "quantizer" and r["rows"] == rows:
                print(f"| {r['quantizer']} | {r.get('implementation', 'torch.compile')} | {r['ms']:.3f} | "
                      f"{r['bytes'] / 1e6:.1f} | {r['gbps']:.0f} | {r['copy_gbps']:.0f} | "
                      f"{r['gbps'] / r['copy_gbps']:.0%} | "
                      f"{compiled.get(r['quantizer'], float('nan')) / r['ms']:.2f}x |")
