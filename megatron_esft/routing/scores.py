"""Expert scores (paper §3.3, Eq. 6-7) from routing counts, from the official routing logs, or from score files.

For every MoE layer l and routed expert i, over the N tokens of the scoring sample:

* Token selection ratio (ESFT-Token, Eq. 7): ``r_i^l = count_i^l / (K * N)``, where ``count_i^l`` is the number of
  tokens that routed to expert i and K the number of routed experts per token. Sums to 1 per layer.
* Average gate score (ESFT-Gate, Eq. 6): ``g_i^l = gate_sum_i^l / N``, where ``gate_sum_i^l`` adds the gate value of
  expert i over the tokens that selected it (0 for the others). What "gate value" means is recorded in the `gate`
  field (see `megatron_esft.routing.collector`); for DeepSeek-V2(-Lite) it is the un-renormalised softmax
  probability, so a layer's gate scores sum to < 1.

Both are normalised **per layer by the token count** (the paper and the official first-commit script that produced
the released `summary.json`), not per expert across layers (the bug in the official repo's HEAD script, issues #8 and
#17). Tokens are pooled over sequences (token-weighted); the paper's per-sequence average is the same thing when every
sequence has the same length, as in its 32 x 4096 sample.

Files:

* `scores.json` (ours): the official `summary.json` shape (`token_scores`, `gate_scores`: ``{layer: {expert: score}}``
  at full precision) plus `counts`, `gate_sums`, `num_tokens`, `topk`, `num_experts`, `gate`, `model`, `data`.
* `summary.json` (official): the two score tables rounded to 4 decimals. Accepted as input too: the official expert
  configs were selected from these rounded values.
* `expert_weights_{layer}.txt` (official routing logs): one line per sequence, the top-K expert ids of every token
  (token-major, tab-separated), an empty field, then the matching gate weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from megatron_esft.atomic import atomic_write_bytes, read_json
from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import ModelShape

METHODS = ("token", "gate")
GATE_KINDS = ("raw", "normalized")  # what the collector sums as "gate value" (see routing.collector)
SCORES_FILE = "scores.json"
OFFICIAL_SUMMARY_FILE = "summary.json"
_LOG_NAME = re.compile(r"^expert_weights_(\d+)\.txt$")


def _sort_layer_keys(keys) -> list[str]:
    return sorted(keys, key=int)


@dataclasses.dataclass
class ExpertScores:
    """Per-layer expert scores; `counts`/`gate_sums`/`num_tokens` are present when known (not for summary.json)."""

    layers: list[str]  # HF decoder-layer keys, ascending
    num_experts: int
    token_scores: np.ndarray  # [L, E] float64
    gate_scores: np.ndarray  # [L, E] float64
    counts: np.ndarray | None = None  # [L, E] int64: tokens that routed to each expert
    gate_sums: np.ndarray | None = None  # [L, E] float64: summed gate values
    num_tokens: np.ndarray | None = None  # [L] int64: tokens seen per layer
    topk: int | None = None
    gate: str | None = None  # what the gate value is, e.g. "raw softmax"
    model: dict | None = None  # where the scores came from (model path, shape)
    data: dict | None = None  # which data (file, tokens)
    source: str = "scores"

    @classmethod
    def from_counts(cls, layers, counts, gate_sums, num_tokens, topk: int, **extra) -> "ExpertScores":
        counts = np.asarray(counts, dtype=np.int64)
        gate_sums = np.asarray(gate_sums, dtype=np.float64)
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        denom = num_tokens.astype(np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            token = np.where(denom > 0, counts / (topk * denom), 0.0)
            gate = np.where(denom > 0, gate_sums / denom, 0.0)
        return cls(
            layers=[str(k) for k in layers],
            num_experts=counts.shape[1],
            token_scores=token,
            gate_scores=gate,
            counts=counts,
            gate_sums=gate_sums,
            num_tokens=num_tokens,
            topk=int(topk),
            **extra,
        )

    def method_scores(self, method: str) -> np.ndarray:
        if method not in METHODS:
            raise UserError(f"--method: unknown scoring method {method!r} (choose from {', '.join(METHODS)})")
        return self.token_scores if method == "token" else self.gate_scores

    def rounded(self, decimals: int) -> "ExpertScores":
        """Scores rounded like the official summary.json (Python `round`); the official configs were selected from
        those rounded values, so equal rounded scores then tie and fall back to the lower expert id."""
        def rnd(table):
            return np.array([[round(float(v), decimals) for v in row] for row in table], dtype=np.float64)

        return dataclasses.replace(self, token_scores=rnd(self.token_scores), gate_scores=rnd(self.gate_scores))

    def layer_index(self, key: str) -> int:
        return self.layers.index(str(key))

    def check_model(self, shape: ModelShape) -> None:
        """Refuse scores that were collected on a different model than the one being configured."""
        mismatch = []
        if list(self.layers) != list(shape.moe_layer_keys):
            mismatch.append(f"layers {_span(self.layers)} vs MoE layers {_span(shape.moe_layer_keys)}")
        if self.num_experts != shape.num_experts:
            mismatch.append(f"{self.num_experts} vs {shape.num_experts} experts")
        if self.topk is not None and shape.topk is not None and self.topk != shape.topk:
            mismatch.append(f"top-{self.topk} vs top-{shape.topk} routing")
        # same MoE shape is not enough: compare what the collector recorded about the model (architecture, sizes)
        recorded = (self.model or {}).get("summary") or {}
        for key, value in (shape.identity or {}).items():
            if key in recorded and recorded[key] is not None and recorded[key] != value:
                mismatch.append(f"{key} {recorded[key]} vs {value}")
        if mismatch:
            raise UserError(
                f"{self.source}: scores are from a different model than {shape.source} ({'; '.join(mismatch)})"
            )

    # ------------------------------------------------------------------------------------------- serialisation

    def summary_dict(self, decimals: int | None = None) -> dict:
        """The official summary.json object; `decimals=4` rounds exactly like the official script."""

        def table(values):
            out = {}
            for li, key in enumerate(self.layers):
                row = [float(v) for v in values[li]]
                out[key] = {str(e): (round(v, decimals) if decimals is not None else v) for e, v in enumerate(row)}
            return out

        return {"token_scores": table(self.token_scores), "gate_scores": table(self.gate_scores)}

    def to_json_dict(self) -> dict:
        out = self.summary_dict()
        if self.counts is not None:
            out["counts"] = {k: {str(e): int(c) for e, c in enumerate(row)} for k, row in zip(self.layers, self.counts)}
            out["gate_sums"] = {
                k: {str(e): float(g) for e, g in enumerate(row)} for k, row in zip(self.layers, self.gate_sums)
            }
            out["num_tokens"] = {k: int(n) for k, n in zip(self.layers, self.num_tokens)}
        out["topk"] = self.topk
        out["num_experts"] = self.num_experts
        out["gate"] = self.gate
        out["model"] = self.model
        out["data"] = self.data
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write scores.json atomically (`path` may be a directory)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / SCORES_FILE
        atomic_write_bytes(path, (json.dumps(self.to_json_dict(), indent=1) + "\n").encode())
        return path


def _span(keys) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return f"{keys[0]}..{keys[-1]} ({len(keys)})" if len(keys) > 1 else f"{keys[0]} (1)"


# ----------------------------------------------------------------------------------------------- loading files


def _table(data: dict, name: str, source: str) -> tuple[list[str], int, np.ndarray]:
    table = data.get(name)
    if not isinstance(table, dict) or not table:
        raise UserError(f"{source}: missing or empty {name!r} table")
    for key in table:
        if not (isinstance(key, str) and key.isdigit()):
            raise UserError(f"{source}: {name}: layer key {key!r} is not a decoder-layer index")
    layers = _sort_layer_keys(table)
    num_experts = None
    rows = []
    for key in layers:
        row = table[key]
        if not isinstance(row, dict) or not all(isinstance(e, str) and e.isdigit() for e in row):
            raise UserError(f"{source}: {name}[{key}]: expected {{expert id: score}}")
        n = len(row)
        if set(row) != {str(e) for e in range(n)}:
            raise UserError(f"{source}: {name}[{key}]: expert ids must be 0..{n - 1}")
        if num_experts is None:
            num_experts = n
        elif n != num_experts:
            raise UserError(f"{source}: {name}[{key}]: {n} experts, but layer {layers[0]} has {num_experts}")
        values = [row[str(e)] for e in range(n)]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values):
            raise UserError(f"{source}: {name}[{key}]: scores must be finite non-negative numbers")
        rows.append(values)
    return layers, num_experts, np.asarray(rows, dtype=np.float64)


def load_scores(path: str | os.PathLike) -> ExpertScores:
    """Read our scores.json or an official summary.json (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        for name in (SCORES_FILE, OFFICIAL_SUMMARY_FILE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(f"{path}: no {SCORES_FILE} or {OFFICIAL_SUMMARY_FILE} in this directory")
    source = str(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with token_scores and gate_scores")
    layers, num_experts, token = _table(data, "token_scores", source)
    glayers, gexperts, gate = _table(data, "gate_scores", source)
    if glayers != layers or gexperts != num_experts:
        raise UserError(f"{source}: token_scores and gate_scores cover different layers or experts")
    extra = {k: data.get(k) for k in ("gate", "model", "data")}
    if all(k in data for k in ("counts", "gate_sums", "num_tokens")) and data.get("topk"):
        clayers, _, counts = _table(data, "counts", source)
        _, _, gate_sums = _table(data, "gate_sums", source)
        tokens = data["num_tokens"]
        if clayers != layers or not isinstance(tokens, dict) or set(tokens) != set(layers):
            raise UserError(f"{source}: counts/num_tokens do not cover the same layers as the scores")
        return ExpertScores.from_counts(
            layers, counts.astype(np.int64), gate_sums, [tokens[k] for k in layers], int(data["topk"]),
            source=source, **extra,
        )
    topk = data.get("topk")
    return ExpertScores(layers=layers, num_experts=num_experts, token_scores=token, gate_scores=gate,
                        topk=int(topk) if topk else None, source=source, **extra)


def read_official_logs(
    directory: str | os.PathLike, topk: int = 6, num_experts: int | None = None
) -> ExpertScores:
    """Counts and gate sums from the official routing logs `expert_weights_{layer}.txt` (layer = HF decoder index).

    `topk` is the routed experts per token (6 for DeepSeek-V2-Lite, the model the official logs come from);
    `num_experts` defaults to the largest expert id seen + 1.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    files = {}
    for entry in directory.iterdir():
        match = _LOG_NAME.match(entry.name)
        if match:
            files[match.group(1)] = entry
    if not files:
        raise UserError(f"{directory}: no expert_weights_<layer>.txt routing logs")
    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    layers = _sort_layer_keys(files)
    per_layer = [_parse_log(files[k], topk) for k in layers]
    max_id = max((int(ids.max()) for ids, _ in per_layer if ids.size), default=-1)
    if num_experts is None:
        num_experts = max_id + 1
    elif max_id >= num_experts:
        bad = next(files[k] for k, (ids, _) in zip(layers, per_layer) if ids.size and ids.max() >= num_experts)
        raise UserError(f"{bad}: expert id {max_id} outside 0..{num_experts - 1}")
    counts = np.zeros((len(layers), num_experts), dtype=np.int64)
    gate_sums = np.zeros((len(layers), num_experts), dtype=np.float64)
    num_tokens = np.zeros(len(layers), dtype=np.int64)
    for li, (ids, weights) in enumerate(per_layer):
        np.add.at(counts[li], ids, 1)
        np.add.at(gate_sums[li], ids, weights)
        num_tokens[li] = ids.size // topk
    return ExpertScores.from_counts(
        layers, counts, gate_sums, num_tokens, topk, gate="raw softmax (official routing logs)",
        source=str(directory), data={"official_logs": str(directory)},
    )


def _parse_log(path: Path, topk: int) -> tuple[np.ndarray, np.ndarray]:
    all_ids, all_weights = [], []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if "\t\t" not in line:
                raise UserError(f"{where}: expected expert ids, an empty field, then gate weights")
            id_text, weight_text = line.split("\t\t", 1)
            try:
                ids = np.array([int(x) for x in id_text.split("\t")], dtype=np.int64)
                weights = np.array([float(x) for x in weight_text.split("\t")], dtype=np.float64)
            except ValueError as exc:
                raise UserError(f"{where}: {exc}") from None
            if ids.size != weights.size:
                raise UserError(f"{where}: {ids.size} expert ids but {weights.size} gate weights")
            if ids.size % topk:
                raise UserError(f"{where}: {ids.size} expert ids is not a multiple of top-k {topk}")
            if ids.min() < 0:
                raise UserError(f"{where}: negative expert id")
            per_token = np.sort(ids.reshape(-1, topk), axis=1)
            if topk > 1 and (np.diff(per_token, axis=1) == 0).any():
                raise UserError(f"{where}: a token lists the same expert twice (is top-k {topk} right?)")
            if not np.isfinite(weights).all() or (weights < 0).any():
                raise UserError(f"{where}: gate weights must be finite and non-negative")
            all_ids.append(ids)
            all_weights.append(weights)
    if not all_ids:
        raise UserError(f"{path}: no routing records")
    return np.concatenate(all_ids), np.concatenate(all_weights)
