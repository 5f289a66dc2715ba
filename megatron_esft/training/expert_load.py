"""Per-layer routed-expert load during training and evaluation, and its drift from the base model's routing.

A forward hook on every `TopKRouter` adds `routing_map.sum(0)` (tokens per expert, padding excluded through the
micro-batch's valid-token mask) into a `[num_layers, num_experts]` table indexed by HF layer key
(`router.layer_number - 1`). `reduce()` sums the table over the whole world: data/expert-parallel ranks route
different tokens, tensor-parallel ranks route different sequence shards (sequence parallelism is always on with
TP > 1), pipeline stages own different layers. The hook runs no host synchronization: the counts add up in a table
on the routers' device (masking by multiplication, not boolean indexing) and reach the host only in `reduce()`, at
log and evaluation time (a copy to the host in every MoE layer's forward would stall the GPU queue every layer).

Drift: the trainer measures the load on the validation set once before training (the base model's routing on
exactly those tokens) and at every evaluation; `drift()` is the total-variation distance between the two load
distributions per layer (0 = identical routing, 1 = disjoint). With ESFT the routers are frozen, so drift comes
only from the trained experts changing the hidden states of later layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_esft.parallel import all_reduce


class ExpertLoadTracker:
    def __init__(self, model_chunks, num_layers: int, num_experts: int):
        from megatron.core.transformer.moe.router import TopKRouter

        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]
        self.shape = (num_layers, num_experts)
        self._counts = None  # int64 [num_layers, num_experts] on the routers' device, made by the first hook call
        self._valid = None
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def set_valid_mask(self, valid: torch.Tensor | None) -> None:
        """[batch, seq] bool of the micro-batch about to run (True = real token)."""
        self._valid = valid

    def _hook(self, router, args, output):
        if router.training and not torch.is_grad_enabled():
            return  # full recompute: the no_grad forward inside the checkpoint; its recompute (with grad) counts
        routing_map = output[1]
        tokens = routing_map.shape[0]
        mask = None
        if self._valid is not None:
            from megatron.core import parallel_state as ps

            valid = self._valid.t().contiguous()  # router tokens are sequence-major: [s, b] flattened
            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            if valid.numel() != tokens and valid.shape[0] % tp == 0:
                step = valid.shape[0] // tp
                valid = valid[rank * step:(rank + 1) * step]
            if valid.numel() == tokens:
                mask = valid.reshape(-1).to(routing_map.device)
        if self._counts is None or self._counts.device != routing_map.device:
            self._counts = torch.zeros(self.shape, dtype=torch.int64, device=routing_map.device)
        per_expert = (routing_map if mask is None else routing_map & mask.unsqueeze(1)).sum(0)
        self._counts[router.layer_number - 1] += per_expert

    @property
    def counts(self) -> torch.Tensor:
        """This rank's table so far, float64 on the host (a device-to-host copy)."""
        if self._counts is None:
            return torch.zeros(self.shape, dtype=torch.float64)
        return self._counts.to(device="cpu", dtype=torch.float64)

    @contextlib.contextmanager
    def separate_table(self):
        """Count into a table of its own inside the block, then go on with the outer one: an evaluation in the middle
        of a logging window (--log-interval not dividing --eval-interval) must not report the window's training
        routing as validation routing, nor hand its validation tokens to the next training log line."""
        outer, self._counts = self._counts, None
        try:
            yield
        finally:
            self._counts = outer

    def reset(self) -> None:
        if self._counts is not None:
            self._counts.zero_()

    def reduce(self) -> torch.Tensor:
        """Global counts (a collective over the world); resets the local table."""
        total = self.counts
        if dist.is_initialized():
            all_reduce(total)
        self.reset()
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def imbalance(counts: torch.Tensor) -> torch.Tensor:
    """max / mean tokens per expert, per layer (1 = perfectly balanced; 0 for layers without tokens)."""
    mean = counts.mean(-1)
    return torch.where(mean > 0, counts.max(-1).values / mean.clamp_min(1e-12), torch.zeros_like(mean))


def drift(counts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-layer total-variation distance between two load distributions."""
    return 0.5 * (load_fractions(counts) - load_fractions(base)).abs().sum(-1)


def moe_rows(counts: torch.Tensor) -> list[int]:
    return [i for i in range(counts.shape[0]) if counts[i].sum() > 0]
