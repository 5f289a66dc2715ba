"""Helpers for the tiny transformers models of tests/eval/conftest.py (a uniquely named module: tests/ is no package)."""

VOCAB = 97
PAD = 0


def megatron_style_forward(model):
    """Adapter: our (tokens, position_ids, Megatron mask True=masked) -> transformers' 4-D bool mask True=attend."""

    def forward(tokens, position_ids, attention_mask):
        return model(input_ids=tokens, position_ids=position_ids, attention_mask=~attention_mask, use_cache=False).logits

    return forward


