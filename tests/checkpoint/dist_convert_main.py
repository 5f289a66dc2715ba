"""torchrun worker: convert HF -> Megatron at the given TP/EP layout, then forward+backward on fixed tokens.

Rank 0 writes {"loss": ...} to OUT/result.json (with PP>1 only the load is checked: no training schedule here).
Usage: dist_convert_main.py HF OUT TP EP PP
"""

import json
import os
import sys

import torch


def fixed_batch(vocab: int, batch: int = 2, seq: int = 16):
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward_backward(model, vocab):
    """Loss, the squared norm of the (vocab-sharded) embedding gradient summed over TP ranks (it collects gradient
    from every path through the network, attention's rope key included), and that of MLA's kv down-projections."""
    from megatron.core import parallel_state

    tokens, labels = fixed_batch(vocab)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    embedding_sq = model.embedding.word_embeddings.weight.grad.double().pow(2).sum()
    # MLA's kv down-projection (column-parallel under TP): its shards' squared gradient norms add up to the full one
    kv_down = [m.weight.grad for name, m in model.named_modules() if name.endswith("linear_kv_down_proj")]
    kv_down_sq = sum(g.double().pow(2).sum() for g in kv_down) if kv_down else torch.zeros((), dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(embedding_sq, group=parallel_state.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(kv_down_sq, group=parallel_state.get_tensor_model_parallel_group())
    return float(loss), grads_finite, float(embedding_sq), float(kv_down_sq)


def main():
    hf, out, tp, ep, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    from megatron_esft import parallel as par
    from megatron_esft.checkpoint.convert import hf_to_mcore, load_model_weights
    from megatron_esft.models.hf_config import load_hf_config
    from megatron_esft.models.provider import build_model

    layout = par.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    hf_to_mcore(hf, os.path.join(out, "mcore"), layout)
    cfg = load_hf_config(hf)
    model = build_model(cfg, layout)
    load_model_weights(model, os.path.join(out, "mcore"))
    if pp > 1:
        layers = sorted(layer.layer_number for layer in model.decoder.layers)
        loss, finite, embedding_sq, kv_down_sq = None, True, None, None
    else:
        layers = None
        loss, finite, embedding_sq, kv_down_sq = forward_backward(model, cfg.vocab_size)
    if par.is_rank0():
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump({"loss": loss, "grads_finite": finite, "stage0_layers": layers, "embedding_grad_sq": embedding_sq,
                       "kv_down_grad_sq": kv_down_sq}, fh)
    par.destroy()


if __name__ == "__main__":
    main()
