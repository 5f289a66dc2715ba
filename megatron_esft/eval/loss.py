"""Validation loss / perplexity over any `logits = forward(tokens, position_ids, attention_mask)` (see generate.py).

Labels follow the transformers convention: same length as the tokens, -100 where no loss is taken; the logits at
position i predict label i + 1. The result is the mean negative log-likelihood per target token over all sequences
(summed in float64, so batching does not change it) and its exponential, the perplexity.

`reference_answer_loss` scores the eval set's reference answers in the official training layout
(utils.get_formatted_input_and_target): tokens(prompt, with BOS) + tokens(" " + answer) + EOS, loss on the answer and
EOS only. The eval prompts already end with "Assistant:".
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_esft.eval.generate import Forward, TokenizerView, build_attention_mask, module_device

IGNORE = -100


@torch.no_grad()
def token_loss(forward: Forward, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
               pad_id: int = 0, device=None) -> dict:
    """sequences: (tokens, labels) pairs. Returns {"loss", "ppl", "tokens"}."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(tokens) for tokens, _ in chunk)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (row_tokens, row_labels) in enumerate(chunk):
            if len(row_tokens) != len(row_labels):
                raise ValueError("tokens and labels must have the same length")
            tokens[i, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
            labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
            valid[i, : len(row_tokens)] = True
        position_ids = torch.arange(width, dtype=torch.long).expand(len(chunk), width).contiguous()
        mask = build_attention_mask(valid)
        logits = forward(tokens.to(device), position_ids.to(device), mask.to(device))
        targets = labels[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                              reduction="sum")
        total += float(nll)
        count += int((targets != IGNORE).sum())
    if count == 0:
        raise ValueError("no target tokens")
    mean = total / count
    return {"loss": mean, "ppl": math.exp(mean), "tokens": count}


def reference_answer_loss(forward: Forward, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                          batch_size: int, device=None) -> dict:
    view = TokenizerView(tokenizer)
    sequences = []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = view.encode_prompt(prompt)
        answer_ids = view.encode_plain(" " + answer) + ([view.eos_id] if view.eos_id is not None else [])
        sequences.append((prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids))
    device = device if device is not None else module_device(forward)
    return token_loss(forward, sequences, batch_size, view.pad_id, device)
