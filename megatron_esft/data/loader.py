"""Micro-batches for training and evaluation: deterministic, sharded over data-parallel ranks, resumable.

Training (`SFTDataLoader`): the dataset's endless sample stream (sft_dataset.py) is cut into global micro-steps of
`micro_batch_size * dp_size` samples, as Megatron's pretraining sampler does; DP rank r takes samples
[r * mbs, (r + 1) * mbs) of each step, so ranks are disjoint and together cover the stream in order.
`consumed_samples` counts samples taken by all ranks together; `state_dict()` / `load_state_dict()` save and restore
it (with a fingerprint of the stream), so a resumed run reads exactly the micro-batches the first run would have
read next, whatever the number of workers.

    loader = SFTDataLoader(train_ds, micro_batch_size=2, dp_rank=rank, dp_size=world)
    batch = next(loader)            # dict of [b, s] tensors: tokens, labels, loss_mask, position_ids, document_ids
    mask = build_attention_mask(batch)   # bool [b, 1, s, s], True = masked out
    ckpt["data"] = loader.state_dict(); ...; loader.load_state_dict(ckpt["data"])

Evaluation (`eval_batches`): one pass over a validation dataset in order, sharded the same way; the last step is
filled with all-padding samples (loss_mask 0) so every rank runs the same number of micro-batches and a token-
weighted loss is exact.
"""

from __future__ import annotations

import math

import torch

from megatron_esft.data.packing import collate, empty_sample
from megatron_esft.data.sft_dataset import SFTDataset
from megatron_esft.errors import UserError


def _default_dp() -> tuple[int, int]:
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    except ImportError:
        pass
    return 0, 1


class _StreamView(torch.utils.data.Dataset):
    """Map-style view of the endless stream (global index -> sample) for torch's DataLoader workers."""

    def __init__(self, dataset: SFTDataset):
        self.dataset = dataset

    def __getitem__(self, index: int):
        return self.dataset.sample(index)


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, start: int, mbs: int, dp_rank: int, dp_size: int):
        self.start, self.mbs, self.dp_rank, self.dp_size = start, mbs, dp_rank, dp_size

    def __iter__(self):
        step = self.start
        while True:
            first = step + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            step += self.mbs * self.dp_size


class SFTDataLoader:
    def __init__(
        self,
        dataset: SFTDataset,
        micro_batch_size: int,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        consumed_samples: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ):
        if dp_rank is None or dp_size is None:
            dp_rank, dp_size = _default_dp()
        if micro_batch_size < 1:
            raise UserError(f"--micro-batch-size {micro_batch_size}: must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.consumed_samples = consumed_samples
        self._iter = None

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def _batch_indices(self, consumed: int) -> list[int]:
        first = consumed + self.dp_rank * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def _start(self):
        if self.num_workers == 0:
            return None
        return iter(
            torch.utils.data.DataLoader(
                _StreamView(self.dataset),
                batch_sampler=_StepSampler(self.consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size),
                collate_fn=collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=False,
            )
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.num_workers:
            if self._iter is None:
                self._iter = self._start()
            batch = next(self._iter)
        else:
            batch = collate([self.dataset.sample(i) for i in self._batch_indices(self.consumed_samples)])
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        self.consumed_samples += self.samples_per_step
        return batch

    def epoch(self) -> int:
        """The epoch of the next sample this rank reads."""
        return self.dataset.locate(self.consumed_samples)[0]

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch(),
            "fingerprint": self.dataset.state_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        fingerprint = self.dataset.state_fingerprint()
        if state.get("fingerprint") not in (None, fingerprint):
            raise UserError(
                "the data position saved in the checkpoint belongs to a different sample stream (training data, "
                "split, --seed, --seq-length or packing changed); an exact resume is not possible"
            )
        self.consumed_samples = int(state["consumed_samples"])
        self._iter = None  # restart workers from the restored position


def num_eval_batches(dataset: SFTDataset, micro_batch_size: int, dp_size: int) -> int:
    return math.ceil(len(dataset) / (micro_batch_size * dp_size))


def eval_batches(dataset: SFTDataset, micro_batch_size: int, dp_rank: int | None = None, dp_size: int | None = None):
    """Yield this rank's micro-batches of one pass over `dataset` (see the module docstring)."""
    if dp_rank is None or dp_size is None:
        dp_rank, dp_size = _default_dp()
    n = len(dataset)
    for step in range(num_eval_batches(dataset, micro_batch_size, dp_size)):
        first = step * micro_batch_size * dp_size + dp_rank * micro_batch_size
        samples = [
            dataset[i] if i < n else empty_sample(dataset.seq_length, dataset.pad_id)
            for i in range(first, first + micro_batch_size)
        ]
        yield collate(samples)
