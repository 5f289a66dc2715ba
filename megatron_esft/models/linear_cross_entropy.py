"""Output layer and cross-entropy loss in one pass over row chunks, for a frozen output layer (ESFT).

Megatron-Core computes the language-model loss as the output layer's logits [s, b, V] (bf16), then
`vocab_parallel_cross_entropy` on an fp32 copy: max, subtract, exp, sum, divide in place, and in backward a scatter
and a scale, then the cast back to bf16 for the dgrad GEMM. With DeepSeek's 102,400-token vocabulary that is 1.6 GB
per 4,096 tokens for every fp32 pass (about 25 GB of memory traffic per micro-batch by our count of its passes: an
estimated ~8 ms at H100 bandwidth, not measured), and the fp32
softmax (1.6 GB) is kept until backward, on top of the bf16 logits and fp32 temporaries at the loss's peak.

When the output weight is frozen the gradient of each token's loss with respect to its hidden state,
`(softmax(l) - onehot(label)) @ W`, does not depend on anything downstream except one scalar per token (the loss
mask / token count the trainer multiplies in). So `linear_cross_entropy` computes, chunk by chunk of rows: the
chunk's bf16 logits (the output layer's own GEMM), one kernel (`torch.compile`d on CUDA) giving the fp32 loss and
the bf16 logit gradient, and that gradient's GEMM with W; the [rows, h] result is all that is kept, and backward
scales it by each token's incoming gradient. Peak extra memory is one chunk's logits and gradient instead of several
full-vocabulary fp32 tensors; no fp32 [s, b, V] tensor is ever written.

Same loss as Megatron's (fp32, from the same bf16 logits; log-sum-exp instead of max-subtract-exp-sum: within fp32
rounding) and the same hidden-state gradient up to bf16 rounding (Megatron scales the logit gradient before rounding
it to bf16, here the token's scalar is applied to the bf16 GEMM result). Labels outside [0, V) give loss = the
log-sum-exp and no one-hot term, as Megatron's vocab-parallel cross-entropy at tensor-parallel size 1 does.
"""

from __future__ import annotations

import torch

from megatron_esft.experts.fp8 import CompiledOnCuda

CHUNK_BYTES = 2**28  # fp32 bytes of one chunk's logits: 256 MiB -> 640 rows at a 102,400-token vocabulary


def _loss_and_logit_grad_reference(logits: torch.Tensor, labels: torch.Tensor):
    """(fp32 loss [rows], logit gradient softmax - onehot [rows, V] in the logits' dtype) of bf16/fp32 logits."""
    vocab, dtype = logits.shape[-1], logits.dtype
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = (labels >= 0) & (labels < vocab)
    target = torch.where(valid, labels, 0)
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = lse - torch.where(valid, picked, 0.0)
    onehot = (torch.arange(vocab, device=logits.device).unsqueeze(0) == target.unsqueeze(1)) & valid.unsqueeze(1)
    grad = torch.exp(logits - lse.unsqueeze(1)) - onehot.float()
    return loss, grad.to(dtype)


_loss_and_logit_grad = CompiledOnCuda(_loss_and_logit_grad_reference)  # one kernel on CUDA (rows vary: dynamic)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a multiple of 64 with at most CHUNK_BYTES of fp32 logits (at least 64)."""
    return max(64, (CHUNK_BYTES // (4 * vocab)) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, rows_per_chunk):
        loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for start in range(0, x.shape[0], rows_per_chunk):
            end = min(start + rows_per_chunk, x.shape[0])
            logits = torch.matmul(x[start:end], weight.t())  # the output layer's GEMM (ColumnParallelLinear, TP 1)
            loss[start:end], logit_grad = _loss_and_logit_grad(logits, labels[start:end])
            del logits
            if grad_x is not None:
                torch.matmul(logit_grad, weight, out=grad_x[start:end])
        ctx.save_for_backward(grad_x)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        grad = (grad_x.float() * grad_loss.unsqueeze(1)).to(grad_x.dtype) if grad_x is not None else None
        return grad, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         rows_per_chunk: int | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of hidden states [s, b, h] through a frozen output weight [V, h] against labels
    [b, s]: what Megatron's `output_layer` + `compute_language_model_loss` return at tensor-parallel size 1."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no weight gradient: the output weight must be frozen")
    s, b, h = hidden.shape
    rows = rows_per_chunk or chunk_rows(weight.shape[0])
    flat_labels = labels.transpose(0, 1).reshape(-1)
    loss = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, flat_labels, rows)
    return loss.view(s, b).transpose(0, 1).contiguous()
