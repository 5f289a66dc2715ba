"""megatron_esft.eval.loss against transformers' own (shifted, -100-ignoring) causal-LM loss on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from eval_tiny_models import PAD, megatron_style_forward

from megatron_esft.eval.loss import IGNORE, reference_answer_loss, token_loss

SEQUENCES = [
    ([1, 5, 17, 33, 8, 40, 2], [IGNORE, IGNORE, IGNORE, 33, 8, 40, 2]),
    ([1, 60, 61], [IGNORE, 60, 61]),
    ([1, 44, 45, 46, 47, 48, 49, 50, 51], [IGNORE] * 5 + [48, 49, 50, 51]),
]


def reference_sum_and_count(model, sequences):
    """One unpadded sequence at a time through transformers; NLL summed in plain float64 Python from its logits.
    transformers' own loss (computed in float32) must agree to float32 precision: same shift and ignore convention."""
    total, count = 0.0, 0
    for tokens, labels in sequences:
        out = model(input_ids=torch.tensor([tokens]), labels=torch.tensor([labels]), use_cache=False)
        log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)
        seq_total, n = 0.0, 0
        for position in range(len(tokens) - 1):
            target = labels[position + 1]
            if target != IGNORE:
                seq_total -= float(log_probs[position, target])
                n += 1
        assert float(out.loss) == pytest.approx(seq_total / n, rel=1e-6)
        total += seq_total
        count += n
    return total, count


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_token_loss_matches_transformers(request, model_name, batch_size):
    model = request.getfixturevalue(model_name)
    total, count = reference_sum_and_count(model, SEQUENCES)
    ours = token_loss(megatron_style_forward(model), SEQUENCES, batch_size=batch_size, pad_id=PAD)
    assert ours["tokens"] == count == 10
    assert ours["loss"] == pytest.approx(total / count, rel=1e-10)
    assert ours["ppl"] == pytest.approx(math.exp(total / count), rel=1e-10)


class _DigitTokenizer:
    """transformers-like surface: encode(text, add_special_tokens) / decode; BOS=1, EOS=2, pad=0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 90) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_reference_answer_loss_layout(tiny_model):
    """Official training layout: BOS + prompt | " " + answer + EOS, loss on the answer part and EOS only."""
    tok = _DigitTokenizer()
    prompts, answers = ["User: q\n\nAssistant:", "User: xy\n\nAssistant:"], ['{"a": 1}', "no"]
    sequences = []
    for p, a in zip(prompts, answers):
        prompt_ids = [1] + [3 + (ord(c) % 90) for c in p]
        answer_ids = [3 + (ord(c) % 90) for c in " " + a] + [2]
        sequences.append((prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids))
    total, count = reference_sum_and_count(tiny_model, sequences)
    ours = reference_answer_loss(megatron_style_forward(tiny_model), tok, prompts, answers, batch_size=2)
    assert ours["tokens"] == count == len(' {"a": 1}') + 1 + len(" no") + 1
    assert ours["loss"] == pytest.approx(total / count, rel=1e-10)
