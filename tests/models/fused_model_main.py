"""Run under TRITON_INTERPRET=1 (Triton's CPU interpreter; set before Megatron imports its Triton kernels):
a tiny DeepSeek-V2 (MLA + YaRN, frozen-aware grouped experts) built eager and with every fusion, same weights.
Prints one JSON line: losses, the largest relative gradient difference, and how often each fused kernel ran."""

import json
import sys

import torch


def _no_autotune_benchmark():
    """Triton's autotuner times each config on a GPU driver, which the interpreter lacks: run the kernel instead
    and report a constant time (every config computes the same result)."""
    from triton.runtime import autotuner

    def do_bench(self):
        def bench(fn, quantiles=None):
            fn()
            return [1.0, 1.0, 1.0]
        return bench

    autotuner.Autotuner.do_bench = property(do_bench)


def main():
    _no_autotune_benchmark()
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.transformer import multi_latent_attention as mla

    from megatron_esft.models.fusions import describe
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    calls = {"rope_q": 0, "rope_kv": 0, "swiglu": 0, "weighted_swiglu": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        setattr(module, name, wrapper)

    counting(mla, "fused_apply_mla_rope_for_q", "rope_q")
    counting(mla, "fused_apply_mla_rope_for_kv", "rope_kv")
    counting(fused_bias_swiglu, "weighted_bias_swiglu_impl", "weighted_swiglu")  # grouped experts
    from megatron.core.transformer import mlp
    counting(mlp, "bias_swiglu_impl", "swiglu")  # dense MLP and shared experts

    initialize(ParallelConfig(), seed=1)
    raw = hf_config_dict(TinySpec(arch="deepseek-v2", yarn=True))
    # mscale != mscale_all_dim: the rotary embedding itself is scaled (it is 1 for the released DeepSeek configs),
    # so the fused kernels must apply it too
    raw["rope_parameters"].update(mscale=1.0, mscale_all_dim=0.707)
    cfg = parse_hf_config(raw)
    runs = {}
    for label, fusions in (("eager", None), ("fused", ["swiglu", "rope"])):
        torch.manual_seed(0)
        model = build_model(cfg, experts="grouped", fusions=fusions)
        if label == "eager":
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
        position_ids = torch.arange(24).unsqueeze(0).expand(2, -1)
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
        runs[label] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                       describe(model))
    eager, fused = runs["eager"], runs["fused"]
    assert eager[1].keys() == fused[1].keys()
    worst = max(((fused[1][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in eager[1].items())
    print("RESULT " + json.dumps({"loss_eager": eager[0], "loss_fused": fused[0], "max_grad_rel": worst,
                                  "grads": len(eager[1]), "calls": calls, "describe": [eager[2], fused[2]]}))


if __name__ == "__main__":
    sys.exit(main())
