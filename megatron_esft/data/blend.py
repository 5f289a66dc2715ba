"""Weighted blends of training data: Megatron-LM's `--data-path 0.5 task 0.5 alignment` syntax for --train-data.

The ESFT paper trains every method on a 1:1 mix of task data and alignment data (esft.md, Table 9-10 ablate it):
`--train-data 1 task.jsonl 1 alignment.jsonl`. Weights are relative shares of *documents* (conversations) in the
stream, like Megatron-LM's blend shares of samples; with packing a sample then holds documents of both sources.

Epoch e of a blend over sources with n_i documents (N = sum n_i in all): source i contributes c_i = round(w_i / sum w
x N) documents (at least one), the next c_i of its own endless stream, which visits its documents in a fresh
permutation on every pass (seeded by seed, source and pass). The picks of all sources are shuffled together (seeded by
seed and epoch) and packed. So a small task file is repeated and a large alignment set subsampled to the requested
shares, every document of a source is seen equally often (within one) before any is seen again, and the stream is a
pure function of (seed, epoch): exact resume works as for one file.
"""

from __future__ import annotations

import hashlib

import numpy as np

from megatron_esft.errors import UserError

_SOURCE_STREAM = 0xB1E0  # random streams of the per-source passes, apart from the split and epoch shuffles


def parse_weighted_paths(values: list[str], flag: str) -> tuple[list[str], list[float] | None]:
    """[PATH ...] -> (paths, None); [WEIGHT PATH WEIGHT PATH ...] (Megatron-LM's blend syntax, recognised by a number
    first) -> (paths, weights)."""
    try:
        float(values[0])
    except (ValueError, IndexError):
        return list(values), None
    if len(values) % 2:
        raise UserError(f"{flag} {' '.join(values)}: a blend needs WEIGHT PATH pairs (an odd number of values given)")
    weights, paths = [], []
    for weight, path in zip(values[::2], values[1::2]):
        try:
            value = float(weight)
        except ValueError:
            raise UserError(f"{flag}: {weight!r} stands where a blend weight goes (WEIGHT PATH pairs)") from None
        if not value > 0 or value == float("inf"):
            raise UserError(f"{flag}: blend weight {weight} of {path}: must be a positive number")
        weights.append(value)
        paths.append(path)
    return paths, weights


class DocumentBlend:
    """The document order of each epoch of a weighted blend (see the module docstring).

    `sources[i]`: the document ids (global, into one Documents) of source i; `weights[i]`: its relative share."""

    def __init__(self, sources: list[np.ndarray], weights: list[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source")
        self.sources = [np.asarray(s, dtype=np.int64) for s in sources]
        self.weights = [float(w) for w in weights]
        self.seed = seed
        total_docs, total_weight = sum(len(s) for s in self.sources), sum(self.weights)
        self.per_epoch = [max(1, round(w / total_weight * total_docs)) for w in self.weights]
        self._passes: dict[tuple[int, int], np.ndarray] = {}

    def _pass(self, source: int, index: int) -> np.ndarray:
        """Source `source`'s documents in the order of its pass `index`."""
        key = (source, index)
        order = self._passes.get(key)
        if order is None:
            ids = self.sources[source]
            order = ids[np.random.default_rng([self.seed, _SOURCE_STREAM, source, index]).permutation(len(ids))]
            if len(self._passes) >= 4 * len(self.sources):  # passes only move forward; keep the recent ones
                self._passes.pop(next(iter(self._passes)))
            self._passes[key] = order
        return order

    def picks(self, epoch: int) -> list[np.ndarray]:
        """Per source, the documents it contributes to `epoch`: positions [e c_i, (e + 1) c_i) of its stream."""
        out = []
        for i, (ids, count) in enumerate(zip(self.sources, self.per_epoch)):
            positions = np.arange(epoch * count, (epoch + 1) * count, dtype=np.int64)
            passes, within = np.divmod(positions, len(ids))
            out.append(np.concatenate([self._pass(i, int(p))[within[passes == p]] for p in np.unique(passes)]))
        return out

    def order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """The documents of `epoch`, all sources' picks shuffled together by `rng`."""
        picks = np.concatenate(self.picks(epoch))
        return picks[rng.permutation(len(picks))]

    def fingerprint(self) -> bytes:
        h = hashlib.sha256(repr((self.weights, self.per_epoch)).encode())
        for ids in self.sources:
            h.update(np.ascontiguousarray(ids).tobytes())
            h.update(b"|")
        return h.digest()

    def describe(self, names: list[str]) -> str:
        """One log line: each source's share, documents, and documents per epoch of the blend."""
        total = sum(self.weights)
        parts = [f"{w / total:.1%} {name} ({len(ids):,} documents, {count:,} per epoch)"
                 for w, name, ids, count in zip(self.weights, names, self.sources, self.per_epoch)]
        return "train data blend: " + ", ".join(parts)
