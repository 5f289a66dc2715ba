"""Greedy batched generation over any causal LM given as `logits = forward(tokens, position_ids, attention_mask)`.

  tokens, position_ids: int64 [b, s]; attention_mask: bool [b, 1, s, s] in Megatron's convention (True = masked out);
  logits: [b, s, vocab] (full vocabulary: under tensor parallelism build the model with `parallel_output=False`).

This is the shape Megatron-Core's `GPTModel.__call__(input_ids, position_ids, attention_mask)` has, so our model is
passed directly; a transformers model needs a two-line adapter (see tests/eval/test_generate.py). No KV cache: each step
re-runs the whole sequence, which is simple and exact, and fast enough for ESFT's eval sets (<= 500 prompts, 128 new
tokens). Pipeline parallelism is not handled here (it needs Megatron's forward schedule).

Greedy = argmax of the last position's logits (ties -> lowest id, as `torch.argmax` and transformers do).
A row stops at its first EOS (the EOS is not returned) or after `max_new_tokens`; the loop stops when all rows stopped.

Padding. Rows of a batch have different prompt lengths:
  * "right" (default): prompts start at column 0 and each row writes its next token right after its own last token;
    position ids are 0..s-1 for every row. Real tokens never see the pads (they lie in the causal future), so this is
    correct even for a model whose attention ignores the mask and applies a plain causal mask.
  * "left": prompts end at the same column (transformers' convention for batched decoder-only generation);
    positions count from 0 at each row's first real token, and the mask hides the pads.
In both, a pad query may attend to itself only, so no softmax row is fully masked (which would give NaN in some kernels
and could leak NaN into MoE routing).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: bool [b, s] (True = real token). Returns bool [b, 1, s, s], True = masked (causal + key padding)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)[None]  # pads attend to themselves: no empty rows
    return (~allowed)[:, None]


def _batch_inputs(rows: list[list[int]], padding_side: str, pad_id: int, device) -> tuple:
    lengths = [len(r) for r in rows]
    width = max(lengths)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        tokens[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, start : start + len(row)] = True
    if padding_side == "left":
        position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        last = torch.full((len(rows),), width - 1, dtype=torch.long)
    else:
        position_ids = torch.arange(width, dtype=torch.long).expand(len(rows), width).clone()
        last = torch.tensor(lengths, dtype=torch.long) - 1
    return tokens.to(device), position_ids.to(device), build_attention_mask(valid).to(device), last.to(device)


@torch.no_grad()
def generate_ids(
    forward: Forward,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    eos_id: int | None,
    pad_id: int = 0,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy continuation token ids for each prompt (prompt ids must already include BOS if the model wants one)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1 or max_new_tokens < 0:
        raise ValueError("batch_size must be >= 1 and max_new_tokens >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[start : start + batch_size]]
        generated: list[list[int]] = [[] for _ in rows]
        done = [max_new_tokens == 0] * len(rows)
        for _ in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            # finished rows are dropped from the batch: their tokens no longer matter
            tokens, position_ids, mask, last = _batch_inputs([rows[i] for i in active], padding_side, pad_id, device)
            logits = forward(tokens, position_ids, mask)
            next_ids = logits[torch.arange(len(active), device=logits.device), last.to(logits.device)].argmax(dim=-1)
            for row_in_batch, i in enumerate(active):
                token = int(next_ids[row_in_batch])
                if eos_id is not None and token == eos_id:
                    done[i] = True
                    continue
                rows[i].append(token)
                generated[i].append(token)
                done[i] = len(generated[i]) >= max_new_tokens
        outputs.extend(generated)
    return outputs


def module_device(model) -> torch.device | None:
    """Where a torch module's parameters live (inputs must go there); None for other callables."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


class TokenizerView:
    """The few tokenizer operations generation needs, over three kinds of tokenizer:
    * ours (`megatron_esft.data.tokenizer.TokenizerAdapter`: encode without specials, `bos_id`/`eos_id`/`pad_id`);
    * transformers (`encode` adds BOS by default, `decode(skip_special_tokens=True)`, `eos_token_id`);
    * Megatron-style (`tokenize`/`detokenize`, `eod`, optional `bos`).
    Prompts get BOS in front, as the official evaluator's transformers text-generation pipeline does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "eos_id") and hasattr(tokenizer, "encode"):
            self.kind = "adapter"
        elif hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
            self.kind = "hf"
        elif hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "detokenize"):
            self.kind = "megatron"
        else:
            raise TypeError("tokenizer needs encode/decode (ours, transformers) or tokenize/detokenize (Megatron)")

    @property
    def eos_id(self) -> int | None:
        return {"adapter": lambda t: t.eos_id, "hf": lambda t: t.eos_token_id,
                "megatron": lambda t: getattr(t, "eod", None)}[self.kind](self.tokenizer)

    @property
    def bos_id(self) -> int | None:
        name = {"adapter": "bos_id", "hf": "bos_token_id", "megatron": "bos"}[self.kind]
        return getattr(self.tokenizer, name, None)

    @property
    def pad_id(self) -> int:
        name = {"adapter": "pad_id", "hf": "pad_token_id", "megatron": "pad"}[self.kind]
        pad = getattr(self.tokenizer, name, None)
        return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode_plain(self, text: str) -> list[int]:
        """Tokens of `text` with no special tokens (for an answer appended to a prompt)."""
        if self.kind == "hf":
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if self.kind == "megatron":
            return list(self.tokenizer.tokenize(text))
        return list(self.tokenizer.encode(text))

    def encode_prompt(self, text: str) -> list[int]:
        if self.kind == "hf":
            return list(self.tokenizer.encode(text))  # add_special_tokens=True: BOS as the official pipeline
        ids = self.encode_plain(text)
        bos = self.bos_id
        return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "hf":
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.kind == "megatron":
            return self.tokenizer.detokenize(ids)
        hf = getattr(self.tokenizer, "hf", None)  # our HFTokenizer wraps a transformers tokenizer
        if hf is not None:
            return hf.decode(ids, skip_special_tokens=True)  # as the official pipeline's text output
        return self.tokenizer.decode(ids)


def generate(
    model: Forward,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> list[str]:
    """Greedy batched generation from text prompts; returns the decoded continuations (prompt not included), like the
    official evaluator's `pipeline('text-generation', do_sample=False, return_full_text=False)`."""
    view = TokenizerView(tokenizer)
    prompt_ids = [view.encode_prompt(p) for p in prompts]
    device = device if device is not None else module_device(model)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        ids = generate_ids(
            model, prompt_ids, max_new_tokens, batch_size, view.eos_id, view.pad_id, padding_side, device
        )
    finally:
        if was_training:
            model.train()
    return [view.decode(row) for row in ids]
