"""Forward-only passes over micro-batches with Megatron-Core's schedule (works for PP=1 and PP>1).

A micro-batch is a dict with `tokens` [b, s] (int64) and `valid` [b, s] (bool, True = real token to count), and
optionally `position_ids` [b, s] and `document_ids` [b, s] (packed samples from megatron_esft.data: attention is then
causal within each document, so a packed token routes exactly as in its document alone); without them positions
are 0..s-1 and attention is plainly causal. The same global list of micro-batches is dealt out round-robin over the data-parallel ranks (expert-parallel
ranks are data-parallel ranks in Megatron-Core); the list is padded with all-padding micro-batches so every rank runs
the same number of forwards (the expert all-to-all and tensor/pipeline-parallel collectives need every rank).
"""

from __future__ import annotations

import torch


def padding_micro_batch(micro_batch_size: int, seq_length: int) -> dict:
    return {
        "tokens": torch.zeros(micro_batch_size, seq_length, dtype=torch.long),
        "valid": torch.zeros(micro_batch_size, seq_length, dtype=torch.bool),
    }


def shard_for_data_parallel_rank(micro_batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """This rank's micro-batches (i % dp_size == dp_rank), padded to the same count on every rank."""
    if not micro_batches:
        return []
    b, s = micro_batches[0]["tokens"].shape
    per_rank = -(-len(micro_batches) // dp_size)
    padded = list(micro_batches) + [padding_micro_batch(b, s)] * (per_rank * dp_size - len(micro_batches))
    return padded[dp_rank::dp_size]


def forward_only(model_chunks, micro_batches: list[dict], on_micro_batch=None, progress=None) -> None:
    """Run the model forward (no grad) over this rank's micro-batches.

    `on_micro_batch(batch)` is called on every pipeline stage right before the model call of that micro-batch (the
    routing collector takes its valid mask there); `progress(batch)` after each micro-batch on the first stage.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        chunk.eval()
    b, s = micro_batches[0]["tokens"].shape
    device = next(chunks[0].parameters()).device
    default_positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)

    def batches():
        for batch in micro_batches:
            yield batch

    iterator = batches()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if on_micro_batch is not None:
            on_micro_batch(batch)
        tokens = batch["tokens"].to(device, non_blocking=True)
        positions = batch["position_ids"].to(device) if "position_ids" in batch else default_positions
        attention_mask = None
        if "document_ids" in batch:
            from megatron_esft.data.packing import build_attention_mask

            attention_mask = build_attention_mask(batch["document_ids"].to(device))
        output = model(tokens, positions, attention_mask)
        if progress is not None and first_stage:
            progress(batch)

        def loss_func(output_tensor):
            return output_tensor.float().sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
