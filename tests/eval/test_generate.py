"""megatron_esft.eval.generate against transformers' own greedy `generate` on a tiny random DeepseekV2ForCausalLM.

The reference is transformers generating each prompt alone (no padding, KV cache), so batching, both padding sides,
masks, position ids and EOS stopping are all checked token for token. float64 keeps greedy ties out of the picture.
"""

from __future__ import annotations

import pytest
import torch

from megatron_esft.eval.generate import build_attention_mask, generate, generate_ids
from eval_tiny_models import PAD, VOCAB, megatron_style_forward

def reference_generate(model, prompt: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_id, pad_token_id=PAD,
    )[0, len(prompt):].tolist()
    return out[: out.index(eos_id)] if eos_id is not None and eos_id in out else out


PROMPTS = [[1, 5, 17, 33, 8], [1, 60], [1, 44, 45, 46, 47, 48, 49, 50, 51], [1, 9, 9, 30]]


def test_mask_shape_and_convention():
    valid = torch.tensor([[False, True, True], [True, True, False]])
    mask = build_attention_mask(valid)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    # row 0 (left-padded): query 2 sees keys 1,2 but not the pad 0 nor the future
    assert mask[0, 0, 2].tolist() == [True, False, False]
    # pad query 0 sees only itself (no fully masked softmax row)
    assert mask[0, 0, 0].tolist() == [False, True, True]
    # row 1 (right-padded): query 1 sees keys 0,1; causal future stays masked
    assert mask[1, 0, 1].tolist() == [False, False, True]


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_greedy_matches_transformers_unbatched(request, model_name, padding_side):
    tiny_model = request.getfixturevalue(model_name)
    max_new = 6
    expected = [reference_generate(tiny_model, p, max_new, eos_id=None) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) > 1, "degenerate random model: all continuations equal"
    ours = generate_ids(megatron_style_forward(tiny_model), PROMPTS, max_new, batch_size=3, eos_id=None,
                        pad_id=PAD, padding_side=padding_side)
    assert ours == expected


def test_transformers_left_padded_batch_agrees(tiny_model):
    """transformers' own batched (left-padded, KV-cached) greedy generation gives the same tokens as ours."""
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = tiny_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=PAD,
                              eos_token_id=None)[:, width:].tolist()
    ours = generate_ids(megatron_style_forward(tiny_model), PROMPTS, 5, batch_size=4, eos_id=None, pad_id=PAD,
                        padding_side="left")
    assert ours == out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stops_at_eos_per_row(tiny_model, padding_side):
    free = [reference_generate(tiny_model, p, 6, eos_id=None) for p in PROMPTS]
    # choose as EOS a token that one row produces mid-way, so rows stop at different steps
    eos_id = free[0][2]
    expected = [reference_generate(tiny_model, p, 6, eos_id=eos_id) for p in PROMPTS]
    assert len(expected[0]) == free[0].index(eos_id) < 6
    assert any(len(e) == 6 for e in expected) or len({len(e) for e in expected}) > 1
    ours = generate_ids(megatron_style_forward(tiny_model), PROMPTS, 6, batch_size=2, eos_id=eos_id, pad_id=PAD,
                        padding_side=padding_side)
    assert ours == expected


class _ToyTokenizer:
    """Character-level tokenizer with the transformers encode/decode surface (BOS added, special tokens skipped)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text):
        return [self.bos_token_id] + [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (0, 1, 2)))


def test_text_generate_decodes_continuation_only(tiny_model):
    tokenizer = _ToyTokenizer()
    prompts = ["User: hi\n\nAssistant:", "ab"]
    texts = generate(megatron_style_forward(tiny_model), tokenizer, prompts, max_new_tokens=4, batch_size=2)
    expected = [reference_generate(tiny_model, tokenizer.encode(p), 4, eos_id=2) for p in prompts]
    assert texts == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_ids(lambda *a: None, [[1]], 1, 1, None, padding_side="middle")
    with pytest.raises(ValueError):
        generate_ids(lambda *a: None, [[]], 1, 1, None)
