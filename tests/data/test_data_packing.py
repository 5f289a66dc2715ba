"""Packing: every document exactly once per epoch, labels never cross documents, per-document attention masks."""

import numpy as np
import pytest
import torch

from megatron_esft.data import SFTDataLoader, build_attention_mask, build_sft_datasets, to_device, valid_token_mask
from megatron_esft.data.packing import pack_documents


def test_pack_documents_first_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    order = rng.permutation(500)
    bins = pack_documents(lengths, order, 64)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(500))
    assert all(lengths[b].sum() <= 64 for b in bins)
    # first-fit keeps the fill high: total padding is small
    assert lengths.sum() / (64 * len(bins)) > 0.9
    # deterministic
    assert all(np.array_equal(a, b) for a, b in zip(bins, pack_documents(lengths, order, 64)))


@pytest.fixture(params=["mixed", "official"])
def corpus(request):
    """The committed generated corpus, and a slice of the official ESFT data (skipped when absent)."""
    return request.getfixturevalue("mixed_chat" if request.param == "mixed" else "official_slice")


def test_packed_samples(corpus, tok):
    seq = 256
    train, _ = build_sft_datasets(corpus, tokenizer=tok, seq_length=seq, pack=True, seed=3)
    unpacked, _ = build_sft_datasets(corpus, tokenizer=tok, seq_length=seq, pack=False, seed=3)
    assert len(train) < len(unpacked) == train.num_documents
    seen = []
    total_loss_tokens = 0
    for i in range(len(train)):
        s = train[i]
        docs = s["document_ids"]
        ids = [int(d) for d in torch.unique_consecutive(docs) if d >= 0]
        seen += ids
        assert (docs[: (docs >= 0).sum()] >= 0).all(), "padding only at the end"
        for d in ids:
            where = (docs == d).nonzero().flatten()
            start, end = int(where[0]), int(where[-1]) + 1
            tokens, target = train.document(d)
            assert end - start == len(tokens) and s["tokens"][start:end].tolist() == tokens.tolist()
            assert s["position_ids"][start:end].tolist() == list(range(len(tokens)))
            assert s["labels"][start : end - 1].tolist() == tokens[1:].tolist()
            assert s["loss_mask"][start:end].tolist() == target[1:].tolist() + [0.0]
        pad = docs < 0
        assert (s["loss_mask"][pad] == 0).all() and (s["tokens"][pad] == tok.pad_id).all()
        total_loss_tokens += int(s["loss_mask"].sum())
    assert sorted(seen) == list(range(train.num_documents))
    assert total_loss_tokens == sum(int(train.document(d)[1][1:].sum()) for d in range(train.num_documents))


def test_attention_mask_is_block_diagonal_causal(corpus, tok):
    seq = 256
    train, _ = build_sft_datasets(corpus, tokenizer=tok, seq_length=seq, pack=True, seed=1)
    batch = next(SFTDataLoader(train, micro_batch_size=4, dp_rank=0, dp_size=1))
    mask = build_attention_mask(batch)
    assert mask.shape == (4, 1, seq, seq) and mask.dtype == torch.bool
    docs = batch["document_ids"]
    for b in range(4):
        d = docs[b].tolist()
        allowed = torch.tensor([[d[i] == d[j] and j <= i for j in range(seq)] for i in range(seq)])
        assert torch.equal(~mask[b, 0], allowed)
        assert (~mask[b, 0]).any(dim=-1).all(), "no fully masked row (softmax must stay finite)"
    assert len(set(docs[docs >= 0].tolist())) > 4, "the batch really packs several documents"
    assert torch.equal(valid_token_mask(batch), docs >= 0)
    moved = to_device(batch, "cpu")
    assert torch.equal(moved["attention_mask"], mask) and torch.equal(moved["tokens"], batch["tokens"])
