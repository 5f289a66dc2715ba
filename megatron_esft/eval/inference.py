"""Loading what generation mode needs: a tokenizer and the model as a forward callable.

`load_forward` is where the model/checkpoint packages plug in (the only place generation mode touches them). Its contract:

    forward = load_forward(load_dir)
    logits = forward(tokens, position_ids, attention_mask)
        tokens, position_ids: int64 [b, s] on the model's device
        attention_mask:       bool [b, 1, s, s], True = masked out (Megatron's convention; see generate.py)
        logits:               [b, s, vocab], the FULL vocabulary (build GPTModel with parallel_output=False under TP)

It initializes Megatron-Core's parallel state (one rank), builds the GPTModel from the HF config carried by the
checkpoint (megatron_esft.models.provider), loads the weights with dist_checkpointing and returns the model itself:
a Megatron-Core GPTModel already has this call signature and returns [b, s, vocab] logits without labels.
Tensor/pipeline parallel generation would need vocabulary gathering and a pipeline schedule; not done here.
"""

from __future__ import annotations

import os

import torch

from megatron_esft.errors import UserError


def load_tokenizer(tokenizer_dir: str):
    """Our tokenizer adapter (megatron_esft.data.tokenizer): HF tokenizer directories and sentencepiece models."""
    from megatron_esft.data.tokenizer import load_tokenizer as load

    return load(tokenizer_dir)


def load_forward(load_dir: str, params_dtype: torch.dtype = torch.float32):
    """The model of checkpoint `load_dir` (base or trained) as a forward callable; contract in the module docstring.

    One process, TP=EP=PP=1 (the whole model on this device): the greedy loop has no pipeline schedule, and under
    tensor parallelism the logits would be vocabulary shards.
    """
    from megatron_esft import parallel as par
    from megatron_esft.checkpoint.convert import load_model_weights
    from megatron_esft.checkpoint.mcore_checkpoint import read_meta
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model

    if not os.path.isdir(load_dir):
        raise UserError(f"--load {load_dir}: not a directory")
    if par.world_size() > 1:
        raise UserError("generation mode runs as one process (no torchrun): the greedy loop has no model parallelism")
    meta = read_meta(load_dir)
    if "hf_config" not in meta:
        raise UserError(f"--load {load_dir}: esft_meta.json has no hf_config")
    cfg = parse_hf_config(meta["hf_config"], source=f"{load_dir} (esft_meta.json)")
    par.initialize(par.ParallelConfig())
    model = build_model(cfg, params_dtype=params_dtype)
    load_model_weights(model, load_dir)
    model.eval()
    return model
