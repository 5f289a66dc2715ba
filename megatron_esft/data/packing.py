"""Packing documents into fixed-length sequences, and the tensors the model receives.

A packed sample of length s holds whole documents one after another, then padding. Each document of n tokens
occupies n positions; inside it `labels[j] = tokens[j+1]` and `loss_mask[j] = target_mask[j+1]`, and its last
position (the EOS) has no target (label = pad id, loss_mask 0), so no label ever crosses a document boundary.

* `document_ids[i]`: the global index of the document at position i, -1 on padding (what the routing collector
  uses to skip padding: `valid_token_mask(batch)`).
* `position_ids[i]`: restarts at 0 for every document (and for the padding block).
* `build_attention_mask(batch)`: bool [b, 1, s, s], Megatron convention (True = masked out): causal and
  block-diagonal per document, so no token attends across samples; padding rows see only earlier padding (never an
  empty row, so softmax stays finite), and no real token sees padding.

`pack_documents` is first-fit over a window of open sequences, in the given (shuffled) order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_OPEN_WINDOW = 64  # open sequences searched by first-fit; older ones are closed (keeps packing O(n))

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


def pack_documents(lengths: np.ndarray, order: np.ndarray, seq_length: int) -> list[np.ndarray]:
    """Group document ids (visited in `order`) into sequences of total length <= seq_length (lengths must fit)."""
    bins: list[list[int]] = []
    room = np.zeros(0, dtype=np.int64)  # free space of the open window bins[first_open:]
    first_open = 0
    for doc in order:
        n = int(lengths[doc])
        fits = np.flatnonzero(room >= n)
        if len(fits):
            k = int(fits[0])
            bins[first_open + k].append(int(doc))
            room[k] -= n
            continue
        bins.append([int(doc)])
        room = np.append(room, seq_length - n)
        if len(room) > _OPEN_WINDOW:
            room = room[1:]
            first_open += 1
    return [np.asarray(b, dtype=np.int64) for b in bins]


def build_sample(
    docs: Sequence[tuple[int, np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One sample from (document id, tokens, target_mask) triples whose lengths sum to <= seq_length."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    document_ids = np.full(seq_length, -1, dtype=np.int64)
    pos = 0
    for doc_id, toks, target in docs:
        n = len(toks)
        end = pos + n
        tokens[pos:end] = toks
        labels[pos : end - 1] = toks[1:]
        loss_mask[pos : end - 1] = target[1:]
        position_ids[pos:end] = np.arange(n)
        document_ids[pos:end] = doc_id
        pos = end
    if pos > seq_length:
        raise ValueError(f"documents of {pos} tokens do not fit in {seq_length}")
    position_ids[pos:] = np.arange(seq_length - pos)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "document_ids": torch.from_numpy(document_ids),
    }


def empty_sample(seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """All padding (used to even out the last evaluation batch across data-parallel ranks)."""
    return build_sample([], seq_length, pad_id)


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def build_attention_mask(batch) -> torch.Tensor:
    """bool [b, 1, s, s], True = masked out (Megatron convention); from `batch["document_ids"]` (or the tensor)."""
    doc = batch["document_ids"] if isinstance(batch, dict) else batch
    if doc.dim() == 1:
        doc = doc.unsqueeze(0)
    s = doc.shape[-1]
    future = torch.ones(s, s, dtype=torch.bool, device=doc.device).triu_(1)
    # build it where the model runs (call after moving document_ids to the GPU): s*s bytes per sample
    return ((doc.unsqueeze(-1) != doc.unsqueeze(-2)) | future).unsqueeze(1)


def to_device(batch: dict, device, attention_mask: bool = True) -> dict:
    """Move a micro-batch to `device` (non-blocking from pinned memory) and add `attention_mask` built there."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if attention_mask:
        out["attention_mask"] = build_attention_mask(out)
    return out


def valid_token_mask(batch) -> torch.Tensor:
    """bool [b, s], True on real tokens (prompt and answer), False on padding."""
    doc = batch["document_ids"] if isinstance(batch, dict) else batch
    return doc >= 0
