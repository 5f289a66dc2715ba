"""Loading what generation mode needs: a tokenizer and the model as a forward callable.

`load_forward` is the one seam left for the model/checkpoint packages (being built in parallel). Its contract:

    forward = load_forward(load_dir)
    logits = forward(tokens, position_ids, attention_mask)
        tokens, position_ids: int64 [b, s] on the model's device
        attention_mask:       bool [b, 1, s, s], True = masked out (Megatron's convention; see generate.py)
        logits:               [b, s, vocab], the FULL vocabulary (build GPTModel with parallel_output=False under TP)

What it has to do: `megatron_esft.parallel.initialize(ParallelConfig(tp=..., ep=..., pp=1), seed=...)`; build the
GPTModel from the HF config carried by the checkpoint (megatron_esft.models provider, TorchSDPACoreAttention on CPU);
load the weights with dist_checkpointing from `load_dir` (base or trained checkpoint: the checkpoint package's loader);
`model.eval()`; return the model itself (a Megatron-Core GPTModel already has this call signature).
Pipeline parallelism is out of scope for the simple generation loop.
"""

from __future__ import annotations

import os

from megatron_esft.errors import UserError


def load_tokenizer(tokenizer_dir: str):
    """A transformers tokenizer from a local directory (what make_tiny_deepseek.py and HF checkpoints carry)."""
    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"--tokenizer {tokenizer_dir}: not a directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer ({exc})") from None


def load_forward(load_dir: str):
    """SEAM: the Megatron-Core model of `load_dir` as a forward callable (contract in the module docstring)."""
    if not os.path.isdir(load_dir):
        raise UserError(f"--load {load_dir}: not a directory")
    raise UserError(
        f"--load {load_dir}: generation mode is not wired to the Megatron-Core model yet "
        "(megatron_esft.eval.inference.load_forward); score existing outputs with --completions FILE"
    )
