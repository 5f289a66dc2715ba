"""Packing is invisible to the model: a tiny DeepSeek-V2 (MLA + MoE) Megatron-Core model gives each document of a
packed micro-batch the same logits as that document run alone, and the mask its core attention receives is the
block-diagonal causal mask (checked with hooks on every layer's core attention)."""

import json

import pytest
import torch

from megatron_esft.data import SFTDataLoader, build_attention_mask, build_sft_datasets

SEQ = 64


@pytest.fixture(scope="module")
def model():
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=7)
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=2, experts=4, topk=2, vocab=512)))
    torch.manual_seed(7)
    return build_model(cfg).eval()


def capture_masks(model):
    from megatron_esft.models.attention import TorchSDPACoreAttention

    seen, handles = [], []

    def hook(module, args, kwargs):
        seen.append(args[3] if len(args) > 3 else kwargs.get("attention_mask"))

    for module in model.modules():
        if isinstance(module, TorchSDPACoreAttention):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    assert handles, "no core attention found"
    return seen, handles


SHORT = [("Hi.", "Hello."), ("1+1?", "2"), ("你好", "你好！"), ("Yes?", "No."), ("Name?", "Ada."), ("开灯", "好的。")]


def test_packed_logits_equal_per_document_logits(model, tmp_path, tok):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in SHORT))
    train, _ = build_sft_datasets(str(path), tokenizer=tok, seq_length=SEQ, pack=True, seed=0)
    assert train.num_truncated == 0
    batch = next(SFTDataLoader(train, micro_batch_size=2, dp_rank=0, dp_size=1))
    docs = batch["document_ids"]
    assert max(len(set(row[row >= 0].tolist())) for row in docs) >= 2, "need a packed row"
    mask = build_attention_mask(batch)

    seen, handles = capture_masks(model)
    try:
        with torch.no_grad():
            packed = model(batch["tokens"], batch["position_ids"], mask)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2  # one per layer
    for received in seen:  # what the attention kernel actually got: no key from another document is visible
        assert received is not None and torch.equal(received, mask)
        same_doc = docs.unsqueeze(-1) == docs.unsqueeze(-2)
        assert received[:, 0][~same_doc].all()

    compared = 0
    with torch.no_grad():
        for b in range(docs.shape[0]):
            for d in sorted(set(docs[b][docs[b] >= 0].tolist())):
                where = (docs[b] == d).nonzero().flatten()
                tokens = batch["tokens"][b, where].unsqueeze(0)
                alone = model(tokens, torch.arange(len(where)).unsqueeze(0), None)  # causal, no packing
                torch.testing.assert_close(packed[b, where], alone[0], rtol=1e-4, atol=1e-4)
                compared += 1
        # the check can fail: without document masking the later documents see the earlier ones
        leaky = model(batch["tokens"], batch["position_ids"], None)
    assert compared >= 3
    row = max(range(docs.shape[0]), key=lambda b: len(set(docs[b][docs[b] >= 0].tolist())))
    later = (docs[row] >= 0) & (docs[row] != docs[row][0])  # documents after the first one in that row
    assert later.any() and not torch.allclose(leaky[row, later], packed[row, later], atol=1e-3)
