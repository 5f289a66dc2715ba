"""Weighted training-data blends (data/blend.py): Megatron-LM's WEIGHT PATH syntax, each epoch's shares of documents,
even coverage of every source, a stream that is a pure function of (seed, epoch), and the split."""

import collections

import numpy as np
import pytest

from megatron_esft.data import build_sft_datasets
from megatron_esft.data.blend import DocumentBlend, parse_weighted_paths
from megatron_esft.data.documents import ConcatDocuments, open_documents, write_indexed_documents
from megatron_esft.errors import UserError


def test_parse_weighted_paths():
    assert parse_weighted_paths(["a.jsonl", "b.jsonl"], "--train-data") == (["a.jsonl", "b.jsonl"], None)
    assert parse_weighted_paths(["1", "a.jsonl", "0.25", "b"], "--train-data") == (["a.jsonl", "b"], [1.0, 0.25])
    for values, message in ((["1", "a", "2"], "odd number"), (["1", "a", "b", "c"], "'b' stands where a blend weight"),
                            (["0", "a"], "must be a positive number"), (["-1", "a"], "must be a positive number"),
                            (["nan", "a"], "must be a positive number"), (["inf", "a"], "must be a positive number")):
        with pytest.raises(UserError, match=message):
            parse_weighted_paths(values, "--train-data")


def _count_sources(orders, sources):
    owner = {int(d): k for k, ids in enumerate(sources) for d in ids}
    return [collections.Counter(owner[int(d)] for d in order) for order in orders]


def test_each_epoch_has_the_weighted_shares_and_every_document_is_visited_evenly():
    small, large = np.arange(5), np.arange(100, 150)  # 5 task documents, 50 alignment documents
    blend = DocumentBlend([small, large], [1.0, 1.0], seed=7)
    assert blend.per_epoch == [28, 28]  # round(0.5 x 55)
    orders = [blend.order(e, np.random.default_rng(e)) for e in range(10)]
    for counts in _count_sources(orders, [small, large]):
        assert counts == {0: 28, 1: 28}
    seen = collections.Counter(int(d) for order in orders for d in order)
    assert {seen[int(d)] for d in small} == {56}  # 280 picks over 5 documents
    assert {seen[int(d)] for d in large} <= {5, 6}  # 280 picks over 50: within one of each other
    # within one pass over a source no document repeats: the first 50 picks of the large source are all distinct
    firsts = np.concatenate([blend.picks(e)[1] for e in range(2)])[:50]
    assert sorted(firsts.tolist()) == large.tolist()
    # uneven weights, three sources: shares of round(w / sum w x N)
    three = DocumentBlend([np.arange(10), np.arange(10, 40), np.arange(40, 100)], [0.2, 0.3, 0.5], seed=1)
    assert three.per_epoch == [20, 30, 50]
    assert _count_sources([three.order(3, np.random.default_rng(0))], three.sources)[0] == {0: 20, 1: 30, 2: 50}


def test_an_epoch_depends_only_on_seed_and_epoch():
    sources, weights = [np.arange(7), np.arange(7, 30)], [3.0, 1.0]
    walked = DocumentBlend(sources, weights, seed=5)
    for e in range(9):
        walked.order(e, np.random.default_rng(e))
    fresh = DocumentBlend(sources, weights, seed=5)
    assert np.array_equal(fresh.order(8, np.random.default_rng(8)), walked.order(8, np.random.default_rng(8)))
    other_seed = DocumentBlend(sources, weights, seed=6)
    assert not np.array_equal(other_seed.picks(0)[1], fresh.picks(0)[1])
    assert fresh.fingerprint() == DocumentBlend(sources, weights, seed=5).fingerprint()
    assert fresh.fingerprint() != DocumentBlend(sources, [1.0, 1.0], seed=5).fingerprint()


def test_blended_datasets_from_files(tok, small_chat, mixed_chat, tmp_path):
    """8 + 120 documents at 1:1 with a 90,10 split: every training epoch holds about as many documents of the small
    file as of the large one, none of them a validation document; validation reads both files unweighted."""
    kwargs = dict(tokenizer=tok, seq_length=256, seed=3)
    train, valid = build_sft_datasets([small_chat, mixed_chat], split="90,10", train_weights=[1, 1], **kwargs)
    docs = train.documents
    assert isinstance(docs, ConcatDocuments) and [len(r) for r in docs.ranges] == [8, 120]
    small_ids, large_ids = (set(np.intersect1d(train.doc_ids, r).tolist()) for r in docs.ranges)
    assert [len(s) for s in train.blend.sources] == [len(small_ids), len(large_ids)]
    assert not set(valid.doc_ids.tolist()) & (small_ids | large_ids)
    assert len(valid.doc_ids) + len(train.doc_ids) == 128
    epoch_docs = np.concatenate([train.sample_documents(i) for i in range(train.num_samples(0))])
    counts = collections.Counter("small" if int(d) in small_ids else "large" for d in epoch_docs)
    assert counts["small"] == counts["large"] == train.blend.per_epoch[0]
    # the same stream from a rebuilt dataset (what a resumed run reads), a different one for other weights
    again, _ = build_sft_datasets([small_chat, mixed_chat], split="90,10", train_weights=[1, 1], **kwargs)
    assert again.state_fingerprint() == train.state_fingerprint()
    last = train.num_samples(0) + train.num_samples(1) + 2
    assert np.array_equal(again.sample_documents(last), train.sample_documents(last))
    skewed, _ = build_sft_datasets([small_chat, mixed_chat], split="90,10", train_weights=[1, 3], **kwargs)
    assert skewed.state_fingerprint() != train.state_fingerprint()
    # without weights: the files concatenated, one permutation per epoch, as before
    plain, _ = build_sft_datasets([small_chat, mixed_chat], split="90,10", **kwargs)
    assert plain.blend is None and np.array_equal(plain.doc_ids, train.doc_ids)
    assert sorted(np.concatenate([plain.sample_documents(i) for i in range(len(plain))]).tolist()) == sorted(
        plain.doc_ids.tolist())


def test_a_blend_of_a_jsonl_file_and_an_indexed_prefix(tok, small_chat, mixed_chat, tmp_path):
    prefix = str(tmp_path / "mixed")
    write_indexed_documents([mixed_chat], tok, prefix)
    docs = open_documents([small_chat, prefix], tok, separate=True)
    direct = open_documents(mixed_chat, tok)
    assert [len(r) for r in docs.ranges] == [8, 120]
    for i in (0, 57, 119):
        for got, want in zip(docs.get(8 + i), direct.get(i)):
            assert np.array_equal(got, want)
    assert docs.where(8 + 3) == f"{prefix}: document 3"
    train, valid = build_sft_datasets([small_chat, prefix], train_weights=[2, 1], tokenizer=tok, seq_length=256)
    assert valid is None and train.blend.per_epoch == [85, 43]


def test_a_source_left_without_training_documents_is_an_error(tok, small_chat, mixed_chat, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(open(small_chat, encoding="utf-8").readline(), encoding="utf-8")
    with pytest.raises(UserError, match=f"--train-data {one}: no training documents in this blend source"):
        for seed in range(50):  # about every other seed puts the single document of `one` into validation
            build_sft_datasets([str(one), mixed_chat], split="50,50", train_weights=[1, 1], tokenizer=tok,
                               seq_length=256, seed=seed)
