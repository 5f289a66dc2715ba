"""SFT datasets: documents -> (shuffled, packed) fixed-length samples, with a deterministic multi-epoch order.

    train, valid = build_sft_datasets(train_data, valid_data=None, split=None, tokenizer=tok, seq_length=4096,
                                      pack=True, seed=1234, template="esft", truncate="warn")

* `train_data` / `valid_data`: a JSONL file or an indexed prefix from tools/preprocess_data.py, or a list of them
  (concatenated). `train_weights`, one per training path, blends them instead (data/blend.py: each epoch's shares of
  documents follow the weights).
* `split`: Megatron style "98,2" (or "98,2,0": train, valid[, test held out and unused]), applied per document
  with a permutation from `seed`; ignored when `valid_data` is given. Neither -> `valid is None`.
* `truncate`: documents longer than `seq_length` keep BOS and their last `seq_length - 1` tokens (the answer is at
  the end; the official code also keeps the tail) and are counted in `num_truncated` with one warning; "error"
  raises `UserError` naming the file:line instead.
* `pack=False`: one document per sample, padded to `seq_length`.

A sample (see packing.py) is a dict of tensors: tokens, labels, loss_mask, position_ids, document_ids [s].
`SFTDataset.sample(g)` is the g-th sample of the endless training stream: epoch e visits the dataset's documents
in a permutation seeded by (seed, e) and packs them; validation keeps file order. `dataset[i]` is `sample(i)` for
i < `len(dataset)` (the samples of epoch 0). `state_fingerprint()` identifies the stream for exact resume.
"""

from __future__ import annotations

import bisect
import hashlib
import logging

import numpy as np

from megatron_esft.data.blend import DocumentBlend
from megatron_esft.data.conversation import check_template
from megatron_esft.data.documents import Documents, check_data_path, open_documents
from megatron_esft.data.packing import build_sample, pack_documents
from megatron_esft.data.tokenizer import TokenizerAdapter
from megatron_esft.errors import UserError

logger = logging.getLogger("megatron_esft.data")

_SPLIT_STREAM = 0x5B1  # separate random streams for the split and the epoch shuffles
_EPOCH_STREAM = 0xE90C
TRUNCATE_MODES = ("warn", "error")


def parse_split(split: str) -> tuple[float, float]:
    """'98,2' / '98,2,0' / '0.98,0.02' -> (train fraction, valid fraction)."""
    try:
        weights = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"--split {split!r}: expected comma-separated weights like 98,2")
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--split {split!r}: expected 1 to 3 non-negative weights like 98,2")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return weights[0] / total, weights[1] / total


class SFTDataset:
    def __init__(
        self,
        documents: Documents,
        doc_ids: np.ndarray,
        seq_length: int,
        pad_id: int,
        bos_id: int | None,
        pack: bool = True,
        seed: int = 1234,
        shuffle: bool = True,
        truncate: str = "warn",
        name: str = "train",
        blend: DocumentBlend | None = None,
    ):
        if seq_length < 2:
            raise UserError(f"--seq-length {seq_length}: must be at least 2")
        if truncate not in TRUNCATE_MODES:
            raise UserError(f"truncate={truncate!r}: expected one of {', '.join(TRUNCATE_MODES)}")
        self.documents = documents
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if len(self.doc_ids) == 0:
            raise UserError(f"{name} data: no samples (after the split)")
        self.seq_length, self.pad_id, self.bos_id = seq_length, pad_id, bos_id
        self.pack, self.seed, self.shuffle, self.name = pack, seed, shuffle, name
        self.blend = blend  # a weighted blend draws each epoch's documents from its sources (data/blend.py)
        full = documents.lengths[self.doc_ids]
        long = np.flatnonzero(full > seq_length)
        if len(long) and truncate == "error":
            d = int(self.doc_ids[long[0]])
            raise UserError(f"{documents.where(d)}: sample has {int(full[long[0]])} tokens, more than --seq-length "
                            f"{seq_length} ({len(long)} such samples; truncate them with --truncate warn)")
        self.num_truncated = len(long)
        if self.num_truncated:
            logger.warning("%s data: %d of %d samples are longer than --seq-length %d and were truncated (BOS + "
                           "their last %d tokens kept)", name, self.num_truncated, len(self.doc_ids), seq_length,
                           seq_length - 1)
        # lengths indexed by global document id (only entries in doc_ids are used)
        self._lengths = np.minimum(documents.lengths, seq_length)
        self.num_documents = len(self.doc_ids)
        self.num_tokens = int(self._lengths[self.doc_ids].sum())
        self._plans: dict[int, list[np.ndarray]] = {}
        self._epoch_starts = [0]  # global index of the first sample of each epoch planned so far

    # ---- epochs --------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.doc_ids
        rng = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch])
        if self.blend is not None:
            return self.blend.order(epoch, rng)
        return self.doc_ids[rng.permutation(len(self.doc_ids))]

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The document ids of each sample in `epoch` (deterministic from seed and epoch)."""
        plan = self._plans.get(epoch)
        if plan is None:
            order = self._order(epoch)
            if self.pack:
                plan = pack_documents(self._lengths, order, self.seq_length)
            else:
                plan = [order[i : i + 1] for i in range(len(order))]
            if len(self._plans) >= 2:  # a stream only moves forward; keep the current and the next epoch
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan

    def num_samples(self, epoch: int = 0) -> int:
        return len(self.epoch_plan(epoch))

    def locate(self, index: int) -> tuple[int, int]:
        """Global stream index -> (epoch, index within the epoch)."""
        if index < 0:
            raise IndexError(index)
        while self._epoch_starts[-1] <= index:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self.num_samples(epoch))
        epoch = bisect.bisect_right(self._epoch_starts, index) - 1
        return epoch, index - self._epoch_starts[epoch]

    # ---- samples -------------------------------------------------------------------------------------------
    def document(self, doc_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and target mask of a document, truncated to seq_length (BOS + tail) when needed."""
        tokens, target = self.documents.get(doc_id)
        if len(tokens) > self.seq_length:
            head = 1 if self.bos_id is not None and tokens[0] == self.bos_id else 0
            keep = self.seq_length - head
            tokens = np.concatenate([tokens[:head], tokens[-keep:]])
            target = np.concatenate([target[:head], target[-keep:]])
        return tokens, target

    def sample_documents(self, index: int) -> np.ndarray:
        epoch, i = self.locate(index)
        return self.epoch_plan(epoch)[i]

    def sample(self, index: int):
        docs = [(int(d), *self.document(int(d))) for d in self.sample_documents(index)]
        return build_sample(docs, self.seq_length, self.pad_id)

    def __len__(self) -> int:
        return self.num_samples(0)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.sample(index)

    def state_fingerprint(self) -> str:
        """Identifies the sample stream (data, split, seed, seq_length, packing) for checkpoint/resume checks."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.doc_ids).tobytes())
        h.update(np.ascontiguousarray(self._lengths[self.doc_ids]).tobytes())
        h.update(repr((self.seq_length, self.pack, self.seed, self.shuffle, self.pad_id)).encode())
        if self.blend is not None:
            h.update(self.blend.fingerprint())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"SFTDataset({self.name}: {self.num_documents} documents, {self.num_tokens} tokens, "
                f"seq_length={self.seq_length}, pack={self.pack}, samples/epoch={len(self)})")


def build_sft_datasets(
    train_data,
    valid_data=None,
    split: str | None = None,
    *,
    tokenizer: TokenizerAdapter,
    seq_length: int,
    pack: bool = True,
    seed: int = 1234,
    template: str = "esft",
    truncate: str = "warn",
    train_weights: list[float] | None = None,
) -> tuple[SFTDataset, SFTDataset | None]:
    """Build (train, valid) datasets; see the module docstring. `train_weights` (one per train path) makes the
    training stream a weighted blend of the paths (data/blend.py); validation always keeps every document once."""
    check_template(template)
    if truncate not in TRUNCATE_MODES:
        raise UserError(f"truncate={truncate!r}: expected one of {', '.join(TRUNCATE_MODES)}")
    train_paths = [train_data] if isinstance(train_data, str) else list(train_data)
    if train_weights is not None and len(train_weights) != len(train_paths):
        raise ValueError(f"{len(train_weights)} weights for {len(train_paths)} training paths")
    for p in train_paths:
        check_data_path(p)
    if valid_data is not None:
        for p in [valid_data] if isinstance(valid_data, str) else list(valid_data):
            check_data_path(p)
    common = dict(seq_length=seq_length, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, pack=pack, seed=seed,
                  truncate=truncate)
    train_docs = open_documents(train_paths, tokenizer, template, separate=train_weights is not None)
    train_ids, valid_docs, valid_ids = np.arange(len(train_docs), dtype=np.int64), None, None
    if valid_data is not None:
        valid_docs = open_documents(valid_data, tokenizer, template)
        valid_ids = np.arange(len(valid_docs))
    elif split is not None:
        train_frac, valid_frac = parse_split(split)
        perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(train_docs))
        n_train = int(round(train_frac * len(perm)))
        n_valid = int(round(valid_frac * len(perm)))
        if valid_frac > 0 and n_valid == 0 and len(perm) > 1:
            n_valid = 1  # a requested validation split gets at least one document
            n_train = min(n_train, len(perm) - 1)
        train_ids = np.sort(perm[:n_train])
        valid_docs, valid_ids = (train_docs, np.sort(perm[n_train : n_train + n_valid])) if n_valid else (None, None)
    blend = None
    if train_weights is not None:
        sources = [train_ids[np.isin(train_ids, ids)] for ids in train_docs.ranges]
        for path, ids in zip(train_paths, sources):
            if not len(ids):
                raise UserError(f"--train-data {path}: no training documents in this blend source (after the split)")
        blend = DocumentBlend(sources, train_weights, seed)
    train = SFTDataset(train_docs, train_ids, name="train", blend=blend, **common)
    valid = SFTDataset(valid_docs, valid_ids, shuffle=False, name="valid", **common) if valid_docs is not None else None
    return train, valid
