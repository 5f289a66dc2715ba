"""Core attention on torch SDPA, used wherever Transformer Engine is absent (CPU, or GPU without TE).

Megatron-Core's local `DotProductAttention` does not accept the `k_channels`/`v_channels` arguments that
`MLASelfAttention` passes (multi_latent_attention.py:155/207; only TE's attention does), and its softmax path needs
fused kernels for arbitrary masks. This module takes the same constructor arguments as TE's `DotProductAttention`,
supports different query/key and value head sizes (MLA) and grouped-query heads, and runs torch's SDPA (flash or
memory-efficient kernels on GPU). `TorchFlexCoreAttention` (fusion "flex_attention", models/fusions.py) runs the
masked case (packed documents) through FlexAttention with a block mask instead.

Masks follow Megatron's convention: a boolean `attention_mask` with True = masked out. When a mask is passed it is
used as is (it must already be causal: the SFT packer builds causal block-diagonal document masks); without one the
attention is causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class TorchSDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("TorchSDPACoreAttention does not support context parallelism; install TE")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        if packed_seq_params is not None:
            raise NotImplementedError("THD packed sequences need TE attention; use document attention masks instead")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is not None and self._use_flex(q, k, v, dropout):
            out = flex_document_attention(q, k, v, attention_mask, self.softmax_scale)
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask.logical_not(), dropout_p=dropout, scale=self.softmax_scale
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale)
        # [b, h, s, dv] -> [s, b, h * dv]
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _use_flex(self, q, k, v, dropout) -> bool:
        return False


class TorchFlexCoreAttention(TorchSDPACoreAttention):
    """TorchSDPACoreAttention whose masked path (packed documents) runs torch's FlexAttention with a block mask built
    from the boolean mask: blocks of query/key pairs that are fully masked (other documents, the future) are skipped
    instead of computed and masked, so attention costs ~ sum(doc_len^2) instead of seq^2. Unmasked (plain causal)
    calls keep SDPA's flash kernels. Falls back to SDPA with dropout, or where FlexAttention has no kernel
    (backward on CPU)."""

    def _use_flex(self, q, k, v, dropout) -> bool:
        if dropout > 0:
            return False
        return q.is_cuda or not (q.requires_grad or k.requires_grad or v.requires_grad)


_COMPILED_FLEX = None
_BLOCK_MASK_CACHE: list = []  # [(weakref to the boolean mask, BlockMask)]: one mask object serves every layer


def _block_mask(attention_mask: torch.Tensor):
    """The BlockMask of a Megatron boolean mask [b, 1, s, s] (True = masked out), cached while that tensor lives."""
    import weakref

    from torch.nn.attention.flex_attention import create_block_mask

    if _BLOCK_MASK_CACHE and _BLOCK_MASK_CACHE[0][0]() is attention_mask:
        return _BLOCK_MASK_CACHE[0][1]
    allowed = attention_mask[:, 0].logical_not()

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    b, s_q, s_kv = allowed.shape
    block_mask = create_block_mask(mask_mod, b, None, s_q, s_kv, device=attention_mask.device)
    _BLOCK_MASK_CACHE[:] = [(weakref.ref(attention_mask), block_mask)]
    return block_mask


def flex_document_attention(q, k, v, attention_mask, scale=None):
    """FlexAttention of q, k [b, h, s, d_qk], v [b, h, s, d_v] under a boolean mask [b, 1, s, s] (True = masked
    out); compiled once (FlexAttention is only fast compiled: Triton on GPU)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX(q, k, v, block_mask=_block_mask(attention_mask), scale=scale)
