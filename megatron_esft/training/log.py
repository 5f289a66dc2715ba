"""Training logs: Megatron-LM's stdout lines and TensorBoard scalars (written by global rank 0 only).

Stdout, every --log-interval (Megatron's field names and order, plus the ESFT ones):

    iteration N/ M | consumed samples: S | elapsed time per iteration (ms): X | learning rate: LR |
    global batch size: G | lm loss: Y | grad norm: Z [| num zeros: K | params norm: W] | trainable params: P |
    tokens/s: T

TensorBoard keys follow Megatron-LM (`lm loss`, `learning-rate`, `grad-norm`, `batch-size`, `lm loss validation`,
`lm loss validation ppl`, `iteration-time`, `num-zeros`, `params-norm`, with --log-memory-to-tensorboard
`mem-allocated-bytes`, `mem-max-allocated-bytes`, `mem-reserved-bytes`) plus `tokens-per-sec`, `trainable-params`,
`expert-load/imbalance/layer_K`, `expert-load/fraction/layer_K` (a histogram over experts),
`expert-load/selected-share/layer_K` (the share of the layer's routed tokens that go to the experts ESFT trains; the
rest go to frozen experts), `expert-load/drift/layer_K` (validation routing vs the base model's), and a
`trainable-params/table` text panel (per-layer trainable counts).
"""

from __future__ import annotations

import math

import torch

from megatron_esft.parallel import is_rank0, print_rank0
from megatron_esft.training import expert_load


MEMORY_FIELDS = (("allocated", "memory_allocated"), ("max allocated", "max_memory_allocated"),
                 ("reserved", "memory_reserved"), ("max reserved", "max_memory_reserved"))


def memory_line(name: str, stats: dict[str, int]) -> str:
    """Megatron-LM's `report_memory` line: `{name} memory (MB) | allocated: A | max allocated: M | reserved: R |
    max reserved: X` (MiB, unrounded); `stats` maps the torch.cuda function names to bytes."""
    return name + " memory (MB)" + "".join(f" | {label}: {stats[key] / 2**20}" for label, key in MEMORY_FIELDS)


def cuda_memory_stats() -> dict[str, int] | None:
    """This rank's torch.cuda allocator statistics in bytes, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {key: getattr(torch.cuda, key)() for _, key in MEMORY_FIELDS}


class TrainingLogger:
    def __init__(self, tensorboard_dir: str | None, selected: dict[int, list[int]] | None = None):
        """`selected`: HF layer index -> the global ids of the experts being trained (None for full fine-tuning)."""
        self.selected = selected
        self.writer = None
        if tensorboard_dir and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)

    def scalar(self, key: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value, iteration)

    def train_line(self, *, iteration, train_iters, consumed, ms_per_iter, lr, gbs, loss, grad_norm, trainable,
                   tokens_per_s, aux_losses: dict | None = None, throughput: float | None = None,
                   num_zeros: float | None = None, params_norm: float | None = None) -> None:
        """Megatron-LM's iteration line; `throughput`: model TFLOP/s per GPU (--log-throughput, training/flops.py);
        `num_zeros` / `params_norm`: --log-num-zeros-in-grad / --log-params-norm, in Megatron-LM's formats."""
        parts = [
            f" iteration {iteration:8d}/{train_iters:8d}",
            f"consumed samples: {consumed:12d}",
            f"elapsed time per iteration (ms): {ms_per_iter:.1f}",
        ]
        if throughput is not None:
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {throughput:.1f}")
            self.scalar("throughput", throughput, iteration)
        parts += [
            f"learning rate: {lr:.6E}",
            f"global batch size: {gbs:5d}",
            f"lm loss: {loss:.6E}",
        ]
        for name, value in (aux_losses or {}).items():
            parts.append(f"{name}: {value:.6E}")
        parts.append(f"grad norm: {grad_norm:.6f}")
        for name, key, value, fmt in (("num zeros", "num-zeros", num_zeros, ".1f"),
                                      ("params norm", "params-norm", params_norm, ".3f")):
            if value is not None:
                parts.append(f"{name}: {value:{fmt}}")
                self.scalar(key, value, iteration)
        parts += [f"trainable params: {trainable}", f"tokens/s: {tokens_per_s:.1f}"]
        print_rank0(" | ".join(parts))
        for key, value in (("lm loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm), ("batch-size", gbs),
                           ("iteration-time", ms_per_iter / 1000.0), ("tokens-per-sec", tokens_per_s),
                           ("trainable-params", trainable)):
            self.scalar(key, value, iteration)
        for name, value in (aux_losses or {}).items():
            self.scalar(name, value, iteration)

    def memory(self, iteration: int, *, print_line: bool, to_tensorboard: bool) -> None:
        """GPU memory after `iteration`: Megatron-LM's `[Rank r] (after N iterations) memory (MB) | ...` line from
        every rank of data-parallel rank 0 (each model-parallel rank holds other weights), and TensorBoard scalars.
        Nothing without CUDA."""
        if not (print_line or to_tensorboard):
            return
        stats = cuda_memory_stats()
        if stats is None:
            return
        if print_line:
            from megatron.core import parallel_state as ps

            if ps.get_data_parallel_rank() == 0:
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                print(f"[Rank {rank}] {memory_line(f'(after {iteration} iterations)', stats)}", flush=True)
        if to_tensorboard:
            for key, name in (("memory_allocated", "mem-allocated-bytes"),
                              ("max_memory_allocated", "mem-max-allocated-bytes"),
                              ("memory_reserved", "mem-reserved-bytes")):
                self.scalar(name, stats[key], iteration)

    def expert_load(self, counts: torch.Tensor, iteration: int, prefix: str = "expert-load") -> None:
        if self.writer is None:
            return
        imb = expert_load.imbalance(counts)
        frac = expert_load.load_fractions(counts)
        for layer in expert_load.moe_rows(counts):
            self.scalar(f"{prefix}/imbalance/layer_{layer}", float(imb[layer]), iteration)
            self.writer.add_histogram(f"{prefix}/fraction/layer_{layer}", frac[layer], iteration)
            if self.selected is not None:
                share = float(frac[layer][self.selected.get(layer, [])].sum())
                self.scalar(f"{prefix}/selected-share/layer_{layer}", share, iteration)

    def trainable_table(self, report, iteration: int = 0) -> None:
        """The trainable-parameter report (esft/freeze.py TrainableReport) as a Markdown table panel."""
        if self.writer is None:
            return
        rows = ["| part | trainable parameters |", "|---|---|"]
        rows += [f"| layer {k} | {v:,} |" for k, v in sorted(report.per_layer.items(), key=lambda kv: int(kv[0]))]
        rows += [f"| embeddings / final norm / output | {report.other:,} |",
                 f"| **total** | **{report.total:,} of {report.total_params:,} "
                 f"({100.0 * report.total / max(report.total_params, 1):.2f}%)** |"]
        self.writer.add_text("trainable-params/table", "\n".join(rows), iteration)

    def validation(self, iteration: int, loss: float, counts: torch.Tensor | None, base: torch.Tensor | None) -> str:
        ppl = math.exp(min(20.0, loss))  # Megatron-LM's cap
        self.scalar("lm loss validation", loss, iteration)
        self.scalar("lm loss validation ppl", ppl, iteration)
        line = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E}"
        if counts is not None and base is not None:
            d = expert_load.drift(counts, base)
            rows = expert_load.moe_rows(base)
            for layer in rows:
                self.scalar(f"expert-load/drift/layer_{layer}", float(d[layer]), iteration)
            if rows:
                line += f" | expert-load drift (max over layers): {max(float(d[r]) for r in rows):.4f}"
        print_rank0("-" * len(line))
        print_rank0(line)
        print_rank0("-" * len(line))
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
