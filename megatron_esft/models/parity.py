"""Logit parity between our Megatron-Core model and an independent reference, in fp32.

Reference: transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (deepseek-v2, deepseek-v3), or the
float64 transcription in `deepseek_moe_reference` (deepseek-moe, which transformers does not ship).
"""

from __future__ import annotations

import torch

from megatron_esft import parallel as par
from megatron_esft.checkpoint.convert import check_same_model, load_model_weights
from megatron_esft.checkpoint.mcore_checkpoint import read_meta
from megatron_esft.models.hf_config import load_hf_config, parse_hf_config
from megatron_esft.models.provider import build_model


def reference_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    cfg = load_hf_config(hf_dir)
    if cfg.arch == "deepseek-moe":
        from megatron_esft.checkpoint.safetensors_io import SafetensorsReader
        from megatron_esft.models.deepseek_moe_reference import forward

        reader = SafetensorsReader(hf_dir)
        return forward(cfg, {k: reader.get(k) for k in reader.keys()}, tokens).float()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def megatron_logits(
    load_dir: str, tokens: torch.Tensor, parallel: par.ParallelConfig = par.ParallelConfig()
) -> torch.Tensor:
    meta = read_meta(load_dir)
    cfg = parse_hf_config(meta["hf_config"])
    par.initialize(parallel)
    model = build_model(cfg, parallel, params_dtype=torch.float32)
    load_model_weights(model, load_dir)
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return logits.float()


def compare_logits(hf_dir: str, load_dir: str, seq_length: int = 32, batch: int = 2, seed: int = 0) -> dict:
    cfg = load_hf_config(hf_dir)
    check_same_model(read_meta(load_dir), cfg, f"--load {load_dir}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length), generator=generator)
    ours = megatron_logits(load_dir, tokens)
    ref = reference_logits(hf_dir, tokens)
    diff = (ours - ref).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "rel_l2": float((ours - ref).norm() / ref.norm()),
        "tokens": int(tokens.numel()),
        "reference": "float64 transcription" if cfg.arch == "deepseek-moe" else "transformers",
        "arch": cfg.arch,
    }
