"""Logit parity between our Megatron-Core model and an independent reference, in fp32.

Reference: transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (deepseek-v2, deepseek-v3), or the
float64 transcription in `deepseek_moe_reference` (deepseek-moe, which transformers does not ship).
"""

from __future__ import annotations

import json
import os
import tempfile

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

    with tempfile.TemporaryDirectory(prefix="esft-dequantized-") as tmp:
        source = _dequantized_copy(hf_dir, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _dequantized_copy(hf_dir: str, tmp: str) -> str:
    """`hf_dir` itself, or for DeepSeek's block-wise FP8 release a float32 copy in `tmp` (weights dequantized with
    DeepSeek's block layout, fp8_blocks.py): transformers 5.23 would dequantize on the CPU itself, but into bf16 and,
    where a dimension is not a multiple of the block, with evenly spread blocks (ceil(rows / scale rows)) instead of
    DeepSeek's full blocks from the top-left (V3's kv_a_proj_with_mqa: 576 rows, blocks of 128)."""
    from safetensors.torch import save_file

    from megatron_esft.checkpoint.convert import SourceWeights
    from megatron_esft.checkpoint.fp8_blocks import SCALE_SUFFIX, BlockFp8Format
    from megatron_esft.checkpoint.safetensors_io import SafetensorsReader
    from megatron_esft.models.hf_config import load_raw_config

    raw = load_raw_config(hf_dir)
    fmt = BlockFp8Format.from_hf_config(raw, os.path.join(hf_dir, "config.json"))
    if fmt is None:
        return hf_dir
    reader = SafetensorsReader(hf_dir)
    source = SourceWeights(reader, hf_dir, fmt, torch.float32, scratch=None)  # the converter's reading and checks
    weights = {n: source.get(n).float() for n in reader.keys() if not n.endswith(SCALE_SUFFIX)}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in raw.items() if k != "quantization_config"}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return tmp


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
