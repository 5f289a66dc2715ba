"""Deterministic order from --seed, DP sharding (disjoint, covering), exact resume, evaluation passes, splits."""

import numpy as np
import pytest
import torch

from megatron_esft.data import SFTDataLoader, build_sft_datasets, eval_batches, num_eval_batches
from megatron_esft.errors import UserError

SEQ = 256


@pytest.fixture(scope="module")
def datasets(mixed_chat, tok):
    return build_sft_datasets(mixed_chat, split="90,10", tokenizer=tok, seq_length=SEQ, seed=11)


def docs_in(batch):
    return [int(d) for row in batch["document_ids"] for d in torch.unique(row) if d >= 0]


def equal_batches(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dp2_shards_are_disjoint_and_cover_an_epoch(datasets):
    train, _ = datasets
    mbs, dp = 2, 2
    n = len(train)  # samples in epoch 0
    loaders = [SFTDataLoader(train, mbs, dp_rank=r, dp_size=dp) for r in range(dp)]
    steps = n // (mbs * dp)
    per_rank = [[d for _ in range(steps) for d in docs_in(next(loader))] for loader in loaders]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert len(per_rank[0]) == len(set(per_rank[0])) and len(per_rank[1]) == len(set(per_rank[1]))
    # the remaining samples of epoch 0 (fewer than one global step) are the first of the next step
    tail = [d for i in range(steps * mbs * dp, n) for d in train.sample_documents(i).tolist()]
    assert sorted(per_rank[0] + per_rank[1] + tail) == sorted(train.doc_ids.tolist())
    assert loaders[0].consumed_samples == loaders[1].consumed_samples == steps * mbs * dp


def test_order_depends_only_on_seed(mixed_chat, tok, datasets):
    train, _ = datasets
    again, _ = build_sft_datasets(mixed_chat, split="90,10", tokenizer=tok, seq_length=SEQ, seed=11)
    other, _ = build_sft_datasets(mixed_chat, split="90,10", tokenizer=tok, seq_length=SEQ, seed=12)
    a, b, c = (SFTDataLoader(d, 2, 0, 1) for d in (train, again, other))
    first = [next(a) for _ in range(3)]
    assert all(equal_batches(x, next(b)) for x in first)
    assert not all(equal_batches(x, next(c)) for x in first)
    # epochs are reshuffled: epoch 1 packs and orders documents differently from epoch 0
    assert [p.tolist() for p in train.epoch_plan(0)] != [p.tolist() for p in train.epoch_plan(1)]


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume(datasets, workers):
    train, _ = datasets
    mbs, dp = 2, 2
    reference = [SFTDataLoader(train, mbs, r, dp) for r in range(dp)]
    # run past the end of epoch 0 so the resumed stream crosses an epoch boundary
    stop = len(train) // (mbs * dp) - 1
    for _ in range(stop):
        for loader in reference:
            next(loader)
    state = reference[0].state_dict()
    assert state["consumed_samples"] == stop * mbs * dp and state["epoch"] == 0
    expected = [[next(loader) for _ in range(4)] for loader in reference]
    resumed = [SFTDataLoader(train, mbs, r, dp, num_workers=workers) for r in range(dp)]
    for loader in resumed:
        loader.load_state_dict(state)
    for r, loader in enumerate(resumed):
        got = [next(loader) for _ in range(4)]
        assert all(equal_batches(x, y) for x, y in zip(expected[r], got))
    assert resumed[0].epoch() == 1


def test_resume_refuses_a_different_stream(mixed_chat, tok, datasets):
    train, _ = datasets
    state = SFTDataLoader(train, 2, 0, 1).state_dict()
    other, _ = build_sft_datasets(mixed_chat, split="90,10", tokenizer=tok, seq_length=SEQ, seed=99)
    with pytest.raises(UserError, match="exact resume is not possible"):
        SFTDataLoader(other, 2, 0, 1).load_state_dict(state)


def test_split_and_eval_pass(datasets):
    train, valid = datasets
    assert set(train.doc_ids).isdisjoint(valid.doc_ids)
    assert len(train.doc_ids) + len(valid.doc_ids) == 120 and len(valid.doc_ids) == round(0.1 * 120)
    mbs, dp = 4, 2
    steps = num_eval_batches(valid, mbs, dp)
    assert steps * mbs * dp > len(valid), "the fixture must leave a partial last step"
    per_rank = [list(eval_batches(valid, mbs, r, dp)) for r in range(dp)]
    assert [len(b) for b in per_rank] == [steps, steps]
    seen = [d for batches in per_rank for b in batches for d in docs_in(b)]
    assert sorted(seen) == sorted(valid.doc_ids.tolist())
    loss_tokens = sum(float(b["loss_mask"].sum()) for batches in per_rank for b in batches)
    assert loss_tokens == sum(float(valid[i]["loss_mask"].sum()) for i in range(len(valid)))
    # the last step is evened out with pure-padding samples (no loss, no routing statistics)
    empty_rows = sum(int((b["document_ids"] < 0).all(dim=1).sum()) for batches in per_rank for b in batches)
    assert empty_rows == steps * mbs * dp - len(valid) > 0


def test_separate_valid_data_and_no_pack(mixed_chat, small_chat, tok):
    train, valid = build_sft_datasets(mixed_chat, valid_data=small_chat, split="50,50", tokenizer=tok,
                                      seq_length=SEQ, pack=False, seed=1)
    assert train.num_documents == 120 and valid.num_documents == 8  # --split ignored with --valid-data
    assert len(train) == 120
    sample = train[0]
    real = sample["document_ids"] >= 0
    assert len(torch.unique(sample["document_ids"][real])) == 1
    with pytest.raises(UserError, match="--split"):
        build_sft_datasets(mixed_chat, split="a,b", tokenizer=tok, seq_length=SEQ)
    train, valid = build_sft_datasets(mixed_chat, tokenizer=tok, seq_length=SEQ)
    assert valid is None and np.array_equal(train.doc_ids, np.arange(120))
