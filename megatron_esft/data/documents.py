"""Tokenized conversations ("documents") from JSONL files or from Megatron indexed datasets.

A document is `(tokens int32[n], target_mask uint8[n])` (see conversation.py). Two stores share one interface
(`len`, `lengths`, `get(i)`, `where(i)`):

* `JsonlDocuments` tokenizes one or more JSONL files in memory (batched through the fast tokenizer).
* `IndexedDocuments` memory-maps what `tools/preprocess_data.py` wrote with Megatron-Core's
  `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`:
    PREFIX_tokens.{bin,idx}       token ids, one sequence per conversation (a standard Megatron GPT-style dataset)
    PREFIX_target_mask.{bin,idx}  uint8, 1 where the token is a trained assistant token, same lengths
    PREFIX_meta.json              template, tokenizer fingerprint, counts (written last: its presence marks a
                                  complete dataset)

`open_documents(path, tokenizer, template)` picks the store: a `.jsonl`/`.json` file, or an indexed prefix (given as
PREFIX, PREFIX_tokens, or any of the files above); several paths of either kind are concatenated (`ConcatDocuments`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np

from megatron_esft.data.conversation import check_template, read_conversations, tokenize_conversations
from megatron_esft.data.tokenizer import TokenizerAdapter
from megatron_esft.errors import UserError

FORMAT = "megatron_esft.sft_documents/1"
TOKENS_SUFFIX = "_tokens"
MASK_SUFFIX = "_target_mask"
META_SUFFIX = "_meta.json"
_BATCH = 1024  # conversations per tokenizer call


def _indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported without megatron.core's "no TE/apex" import warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class Documents:
    lengths: np.ndarray  # int64[num_documents]

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def where(self, i: int) -> str:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


class JsonlDocuments(Documents):
    def __init__(self, paths: Sequence[str], tokenizer: TokenizerAdapter, template: str = "esft"):
        tokens, masks, sources = [], [], []
        for path in paths:
            for batch in _batched(read_conversations(path), _BATCH):
                for conv, (t, m) in zip(batch, tokenize_conversations(batch, tokenizer, template)):
                    tokens.append(t)
                    masks.append(m)
                    sources.append(conv.source)
        self.lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self._tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        self._masks = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
        self._sources = sources

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._tokens[lo:hi], self._masks[lo:hi]

    def where(self, i: int) -> str:
        return self._sources[i]


def _batched(items: Iterable, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def indexed_prefix(path: str) -> str | None:
    """The dataset prefix if `path` names an indexed SFT dataset (PREFIX, PREFIX_tokens, or one of its files)."""
    candidates = [path]
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            candidates.append(path[: -len(suffix)])
    for c in list(candidates):
        for suffix in (TOKENS_SUFFIX, MASK_SUFFIX):
            if c.endswith(suffix):
                candidates.append(c[: -len(suffix)])
    if path.endswith(META_SUFFIX):
        candidates.append(path[: -len(META_SUFFIX)])
    for c in candidates:
        if os.path.exists(c + TOKENS_SUFFIX + ".idx") or os.path.exists(c + META_SUFFIX):
            return c
    return None


class IndexedDocuments(Documents):
    def __init__(self, prefix: str, tokenizer: TokenizerAdapter | None = None, template: str | None = None):
        IndexedDataset = _indexed_dataset_module().IndexedDataset

        self.prefix = prefix
        meta_path = prefix + META_SUFFIX
        for p in [meta_path] + [prefix + s + e for s in (TOKENS_SUFFIX, MASK_SUFFIX) for e in (".bin", ".idx")]:
            if not os.path.exists(p):
                raise UserError(f"{prefix}: incomplete indexed dataset, {os.path.basename(p)} is missing")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{meta_path}: unreadable ({exc})")
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: unknown format {self.meta.get('format')!r} (expected {FORMAT})")
        if template is not None and self.meta["template"] != template:
            raise UserError(f"{prefix}: preprocessed with template {self.meta['template']!r}, "
                            f"but {template!r} was requested")
        if tokenizer is not None and self.meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
            raise UserError(f"{prefix}: preprocessed with a different tokenizer ({self.meta['tokenizer']}); "
                            f"re-run tools/preprocess_data.py with --tokenizer {tokenizer.path}")
        try:
            self._tokens = IndexedDataset(prefix + TOKENS_SUFFIX)
            self._masks = IndexedDataset(prefix + MASK_SUFFIX)
        except (AssertionError, ValueError, OSError) as exc:
            raise UserError(f"{prefix}: corrupt indexed dataset ({type(exc).__name__}: {exc})")
        self.lengths = self._tokens.sequence_lengths.astype(np.int64)
        if not np.array_equal(self.lengths, self._masks.sequence_lengths):
            raise UserError(f"{prefix}: {TOKENS_SUFFIX} and {MASK_SUFFIX} files do not match")
        if len(self.lengths) != self.meta["num_documents"]:
            expected = self.meta["num_documents"]
            raise UserError(f"{prefix}: {len(self.lengths)} documents but the meta file says {expected}")

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._tokens[int(i)], self._masks[int(i)]

    def where(self, i: int) -> str:
        return f"{self.prefix}: document {i}"


class ConcatDocuments(Documents):
    """Several stores as one: document ids run through the parts in order; `ranges[k]` are part k's ids."""

    def __init__(self, parts: Sequence[Documents]):
        self.parts = list(parts)
        counts = [len(part) for part in self.parts]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.ranges = [np.arange(self._starts[k], self._starts[k + 1]) for k in range(len(self.parts))]
        self.lengths = np.concatenate([part.lengths for part in self.parts]) if self.parts else np.zeros(0, np.int64)

    def _locate(self, i: int) -> tuple[Documents, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], int(i - self._starts[k])

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part, local = self._locate(i)
        return part.get(local)

    def where(self, i: int) -> str:
        part, local = self._locate(i)
        return part.where(local)


def _open_one(path: str, tokenizer: TokenizerAdapter, template: str) -> Documents:
    prefix = indexed_prefix(path)
    return JsonlDocuments([path], tokenizer, template) if prefix is None else IndexedDocuments(prefix, tokenizer,
                                                                                             template)


def open_documents(paths, tokenizer: TokenizerAdapter, template: str = "esft", separate: bool = False) -> Documents:
    """Documents from JSONL file(s) and/or indexed prefixes, concatenated in order. `separate=True` returns a
    `ConcatDocuments` whose `ranges` tell each path's documents apart (for weighted blends)."""
    check_template(template)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no data path given")
    if separate or any(indexed_prefix(p) is not None for p in paths):
        parts = [_open_one(p, tokenizer, template) for p in paths]
        return parts[0] if len(parts) == 1 and not separate else ConcatDocuments(parts)
    return JsonlDocuments(paths, tokenizer, template)


def check_data_path(path: str) -> None:
    """UserError unless `path` is an existing JSONL file or indexed prefix (cheap check before tokenizing)."""
    if indexed_prefix(path) is None and not os.path.isfile(path):
        raise UserError(f"{path}: no such file (expected FILE.jsonl or an indexed prefix with {path}_tokens.idx)")


def write_indexed_documents(
    input_paths: Sequence[str],
    tokenizer: TokenizerAdapter,
    output_prefix: str,
    template: str = "esft",
    max_length: int | None = None,
    truncate: str = "warn",
) -> dict:
    """Tokenize JSONL file(s) into PREFIX_tokens / PREFIX_target_mask / PREFIX_meta.json; returns the meta dict.

    Documents are stored whole; truncation to --seq-length happens when training reads them. With `max_length` and
    `truncate="error"` an over-long sample fails here already. Nothing is left behind on error: everything is written
    to temporary files in the output directory and renamed at the end (the meta file last).
    """
    check_template(template)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"{output_prefix}: output directory {out_dir} does not exist")
    for path in input_paths:  # fail on a missing input before doing any work
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
    indexed_dataset = _indexed_dataset_module()
    DType, IndexedDatasetBuilder = indexed_dataset.DType, indexed_dataset.IndexedDatasetBuilder
    tmp_dir = tempfile.mkdtemp(dir=out_dir, prefix=".preprocess.")
    tmp_prefix = os.path.join(tmp_dir, "data")
    try:
        token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
        tok_builder = IndexedDatasetBuilder(tmp_prefix + TOKENS_SUFFIX + ".bin", dtype=token_dtype)
        mask_builder = IndexedDatasetBuilder(tmp_prefix + MASK_SUFFIX + ".bin", dtype=np.uint8)
        num_docs = num_tokens = num_targets = num_long = 0
        for path in input_paths:
            for batch in _batched(read_conversations(path), _BATCH):
                for conv, (tokens, mask) in zip(batch, tokenize_conversations(batch, tokenizer, template)):
                    if max_length is not None and len(tokens) > max_length:
                        if truncate == "error":
                            raise UserError(f"{conv.source}: sample has {len(tokens)} tokens, more than --seq-length "
                                            f"{max_length}")
                        num_long += 1
                    tok_builder.add_document(tokens, [len(tokens)])
                    mask_builder.add_document(mask, [len(mask)])
                    num_docs += 1
                    num_tokens += len(tokens)
                    num_targets += int(mask.sum())
        tok_builder.finalize(tmp_prefix + TOKENS_SUFFIX + ".idx")
        mask_builder.finalize(tmp_prefix + MASK_SUFFIX + ".idx")
        meta = {
            "format": FORMAT,
            "template": template,
            "tokenizer": tokenizer.path,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "num_documents": num_docs,
            "num_tokens": num_tokens,
            "num_target_tokens": num_targets,
            "num_longer_than_max_length": num_long,
            "max_length": max_length,
            "sources": [os.path.abspath(p) for p in input_paths],
        }
        with open(tmp_prefix + META_SUFFIX, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        for suffix in [s + e for s in (TOKENS_SUFFIX, MASK_SUFFIX) for e in (".bin", ".idx")] + [META_SUFFIX]:
            os.replace(tmp_prefix + suffix, output_prefix + suffix)
        return meta
    finally:
        for name in os.listdir(tmp_dir):
            os.unlink(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)
