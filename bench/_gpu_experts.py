"""The expert-level jobs of bench/gpu_esft.py: `check` (the grouped experts, bf16 and FP8, against Megatron's
SequentialMLP at the real expert shape, same weights) and `experts` (one routed-experts layer, forward + backward,
timed). Both take the model dict (V2_LITE or TINY) of gpu_esft.py."""

from __future__ import annotations

from _gpu_timing import profile_kernels, timed

TRAINABLE_PER_LAYER = 6


# --------------------------------------------------------------------------------------------------- helpers
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def init_parallel(seed=1):
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=seed)


def _experts_layer(raw, trainable_ids, backend, cache, seq_reference=False, fused_swiglu=False):
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_esft.experts import FrozenAwareGroupedExperts

    gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=1, hidden_size=raw["hidden_size"], num_attention_heads=raw["num_attention_heads"],
        num_moe_experts=raw["n_routed_experts"], moe_router_topk=raw["num_experts_per_tok"],
        moe_ffn_hidden_size=raw["moe_intermediate_size"], moe_grouped_gemm=False, use_cpu_initialization=not gpu,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=fused_swiglu,
        gradient_accumulation_fusion=False, params_dtype=torch.bfloat16, bf16=True)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    n = raw["n_routed_experts"]
    if seq_reference:
        layer = SequentialMLP(n, config, sub, get_default_pg_collection())
        for j, expert in enumerate(layer.local_experts):
            expert.requires_grad_(j in trainable_ids)
        return layer
    layer = FrozenAwareGroupedExperts(n, config, sub, get_default_pg_collection())
    layer.set_trainable_experts(trainable_ids)
    layer.set_gemm_backend(backend, cache)
    return layer


def _routed_inputs(raw, tokens, seed):
    """Dispatcher-style inputs: rows sorted by expert, top-k counts from a random (non-uniform) routing."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    n, k, h = raw["n_routed_experts"], raw["num_experts_per_tok"], raw["hidden_size"]
    weights = torch.rand(n, generator=g) + 0.2
    weights[0] = 0.0  # one expert without tokens (zero-size group)
    counts = torch.multinomial(weights, tokens * k, replacement=True, generator=g).bincount(minlength=n)
    x = torch.randn(tokens * k, h, generator=g).to(dev, torch.bfloat16)
    probs = torch.rand(tokens * k, generator=g).to(dev, torch.float32)
    dy = torch.randn(tokens * k, h, generator=g).to(dev, torch.bfloat16)
    return counts, x, probs, dy


# ------------------------------------------------------------------------------------- check + expert timing
def run_check(args, raw):
    """Grouped experts (bf16, FP8) against Megatron's SequentialMLP at the real expert shape, same weights."""
    import torch

    init_parallel()
    trainable = list(range(1, raw["n_routed_experts"], raw["n_routed_experts"] // TRAINABLE_PER_LAYER))[:6]
    ref = _experts_layer(raw, trainable, None, None, seq_reference=True)
    counts, x, probs, dy = _routed_inputs(raw, args.tokens, seed=11)
    rows = []

    tpe, routing_map, tokens, router_probs, d_out = _routing_inputs(raw, args.tokens, seed=12)

    def fwd_bwd(layer, from_tokens=False, device_counts=False):
        """From permuted rows; or from tokens: the experts permute them, the reference behind the gather permutation."""
        from megatron_esft.experts.permutation import permute_tokens, unpermute_tokens

        for p in layer.parameters():
            p.grad = None
        xi = (tokens if from_tokens else x).clone().requires_grad_(True)
        if not from_tokens:
            out, _ = layer(xi, counts, probs)
        elif hasattr(layer, "local_experts"):
            rows_in, row_probs, mapping = permute_tokens(xi, router_probs, routing_map, raw["num_experts_per_tok"])
            out = unpermute_tokens(layer(rows_in, tpe, row_probs)[0], mapping)
        else:  # with the token counts on the device: no count read on the host, one GEMM for all experts
            out, _ = layer(xi, tpe.to(routing_map.device) if device_counts else tpe, router_probs,
                           routing_map=routing_map)
        out.backward(d_out if from_tokens else dy)
        grads = {}
        for j in trainable:
            for proj in ("fc1", "fc2"):
                if hasattr(layer, "local_experts"):
                    grads[(j, proj)] = getattr(layer.local_experts[j], f"linear_{proj}").weight.grad.clone()
                else:
                    group, row = layer.placement(j)
                    grads[(j, proj)] = getattr(layer, f"{proj}_{group}").grad[row].clone()
        return out.detach(), xi.grad, grads

    from megatron_esft.experts import fp8, fp8_triton_gemm, fp8_triton_quantize

    refs = {False: fwd_bwd(ref), True: fwd_bwd(ref, from_tokens=True)}
    variants = [("bf16", False, False, False), ("bf16", True, False, False), ("fp8", False, False, False),
                ("bf16", False, True, False), ("bf16", True, True, False), ("fp8", False, True, False),
                ("bf16", True, True, True), ("fp8", False, True, True)]
    if fp8_triton_gemm.usable(x):  # the Triton FP8 GEMMs (experts/fp8_triton_gemm.py) on the default path
        variants.append(("fp8", False, True, True, "triton"))
    if fp8_triton_quantize.usable(x):  # the hand-written quantizers (fp8_triton_quantize.py)
        variants.append(("fp8", False, True, True, "torch", "triton"))
    for backend, fused, from_tokens, device_counts, *kernels in variants:
        # bf16 + fused: Megatron's compiled weighted SwiGLU; fp8 always fuses its quantizations into the SwiGLU
        kernel, quantizer = (kernels + ["torch", "inductor"][len(kernels):])[:2]
        fp8.set_fp8_gemm_kernel(kernel)
        fp8.set_fp8_quantizer(quantizer)
        gemm_launches, quantizer_launches = fp8_triton_gemm.launches, fp8_triton_quantize.launches
        layer = _experts_layer(raw, trainable, backend, "frozen", fused_swiglu=fused)
        layer.load_state_dict(ref.state_dict())
        if device_counts:
            layer.set_token_counts("device")
            assert layer.counts_on_device()
        out, dx, g = fwd_bwd(layer, from_tokens, device_counts)
        out_ref, dx_ref, g_ref = refs[from_tokens]
        wgrad = max(_rel(g[key], g_ref[key]) for key in g_ref)
        nan = not (torch.isfinite(out).all() and torch.isfinite(dx).all())
        rows.append({"kind": "check", "backend": backend + (" fused SwiGLU" if fused else "")
                     + (", experts permute the tokens" if from_tokens else "")
                     + (", token counts on the device" if device_counts else "")
                     + (", Triton GEMMs" if fp8_triton_gemm.launches > gemm_launches else "")
                     + (", Triton quantizers" if fp8_triton_quantize.launches > quantizer_launches else ""),
                     "out_rel": _rel(out, out_ref), "dgrad_rel": _rel(dx, dx_ref),
                     "wgrad_rel_max": wgrad, "nan": bool(nan)})
    fp8.set_fp8_gemm_kernel("torch")
    fp8.set_fp8_quantizer("inductor")
    return rows


def _routing_inputs(raw, tokens, seed):
    """Router-style inputs for experts that permute themselves: tokens [T, H], a top-k routing map [T, E] from
    non-uniform random scores (expert 0 gets no token), router probabilities [T, E], the output gradient [T, H]."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    n, k, h = raw["n_routed_experts"], raw["num_experts_per_tok"], raw["hidden_size"]
    scores = torch.randn(tokens, n, generator=g) + torch.rand(n, generator=g)
    scores[:, 0] = -1e9
    routing_map = torch.zeros(tokens, n, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    probs = torch.softmax(scores, dim=1) * routing_map
    x = torch.randn(tokens, h, generator=g).to(dev, torch.bfloat16)
    dy = torch.randn(tokens, h, generator=g).to(dev, torch.bfloat16)
    return routing_map.sum(dim=0), routing_map.to(dev), x, probs.to(dev), dy


def run_experts(args, raw, sources=None):
    """One routed-experts layer, forward+backward (input grad needed, as in a middle layer): from dispatcher-style
    permuted rows (the experts alone), and from the layer's tokens with the experts permuting them themselves (the
    default "experts" permutation at EP = 1: permutation, regroup-free grouping and un-permutation included).
    `sources`, if given, keeps the variants of those inputs only ("rows", "tokens", "tokens, device counts")."""
    import torch

    init_parallel()
    n = raw["n_routed_experts"]
    esft = list(range(1, n, n // TRAINABLE_PER_LAYER))[:TRAINABLE_PER_LAYER]
    # (mode, backend, fp8 weight cache, Megatron's fused SwiGLU, input); fp8 always fuses SwiGLU + quantization
    variants = [("esft", "sequential", None, False, "rows"), ("esft", "bf16", None, False, "rows"),
                ("esft", "bf16", None, True, "rows"), ("esft", "fp8", "none", True, "rows"),
                ("esft", "fp8", "frozen", True, "rows"), ("fft", "bf16", None, True, "rows"),
                ("fft", "fp8", "none", True, "rows"),
                ("esft", "bf16", None, True, "tokens"), ("esft", "fp8", "frozen", True, "tokens"),
                ("esft", "fp8", "none", True, "tokens"), ("fft", "bf16", None, True, "tokens"),
                ("fft", "fp8", "none", True, "tokens"),
                # the token counts on the device (--moe-token-counts device): one GEMM per projection for all experts
                ("esft", "bf16", None, True, "tokens, device counts"),
                ("esft", "fp8", "frozen", True, "tokens, device counts")]
    if sources:
        unknown = set(sources) - {v[-1] for v in variants}
        if unknown:
            raise SystemExit(f"experts job: unknown sources {sorted(unknown)}")
        variants = [v for v in variants if v[-1] in sources]
    counts, x, probs, dy = _routed_inputs(raw, args.tokens, seed=3)
    token_inputs = _routing_inputs(raw, args.tokens, seed=3)
    rows = []
    for mode, backend, cache, fused, source in variants:
        ids = esft if mode == "esft" else list(range(n))
        layer = _experts_layer(raw, ids, backend, cache or "none", seq_reference=backend == "sequential",
                               fused_swiglu=fused and backend == "bf16")
        if source == "tokens, device counts":
            layer.set_token_counts("device")
            assert layer.counts_on_device()
        if source == "rows":
            tpe = counts

            def step():
                xi = x.detach().requires_grad_(True)
                out, _ = layer(xi, counts, probs)
                out.backward(dy)
        else:
            tpe, routing_map, tokens, router_probs, d_out = token_inputs
            counts_arg = tpe.to(routing_map.device) if source == "tokens, device counts" else tpe

            def step():
                xi = tokens.detach().requires_grad_(True)
                out, _ = layer(xi, counts_arg, router_probs, routing_map=routing_map)
                out.backward(d_out)
        ms = timed(step, args)[0]
        label = f"experts {mode} {backend} {cache}" + (" fused SwiGLU" if fused else "") + f" from {source}"
        if args.profile:
            profile_kernels(label, step)
        per_expert = 3 * raw["hidden_size"] * raw["moe_intermediate_size"]
        routed, trainable_rows = int(sum(tpe)), int(sum(tpe[j] for j in ids))
        flops = 2 * per_expert * (2 * routed + trainable_rows)  # fwd + dgrad for all rows, wgrad trainable
        rows.append({"kind": "experts", "mode": mode, "backend": backend, "cache": cache, "fused": fused, "ms": ms,
                     "tflops": flops / ms / 1e9, "rows": routed, "source": source})
        del layer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows
