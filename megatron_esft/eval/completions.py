"""Completions files: what a model generated for each eval sample, so any system's outputs are scored the same way.

Our format (JSONL, one record per eval sample; written by `tools/evaluate.py` in generation mode):

    {"idx": 17, "prompt": "User: ...\\n\\nAssistant:", "prediction": " {\\"intent\\": ...}", "raw_answers": ["{...}"]}

  * `prediction` (required; `raw_prediction` is accepted as an alias): the generated continuation only, decoded text,
    without the prompt (the official pipeline's `return_full_text=False`).
  * `idx` (optional): the `idx` of the eval-data record it answers.
  * `prompt` (optional): the prompt text; used to find the eval-data record when `idx` is absent.
  * `raw_answers` (optional, list of strings): the references; only the first is scored (as the official code does).
    Without them, `--eval-data` supplies the references.

The official ESFT results format (`eval_multigpu.py` output, `results/completions/<variant>/<task>.jsonl`) is read as
well: `{"example": {"prompt": ..., "raw_prediction": ..., "raw_answers": [...]}, "score": s}`. Its per-rank files
(`<out>.rank_<r>`) can simply all be passed; the recorded `score` is kept as `recorded_score` and ignored for scoring.

With eval data, every completion is matched to its eval record by `idx`, else by exact `prompt`; each eval record must
be answered exactly once, and references present in both files must agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from megatron_esft.atomic import atomic_write_file
from megatron_esft.errors import UserError


@dataclass
class Completion:
    prediction: str
    where: str  # "file:line", for error messages
    idx: int | None = None
    prompt: str | None = None
    raw_answers: list[str] | None = None
    recorded_score: float | None = None  # official files carry the score their evaluator gave
    extra: dict = field(default_factory=dict)


@dataclass
class EvalSample:
    idx: int
    prompt: str
    raw_answers: list[str]
    where: str


def _read_jsonl(path: str):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            yield where, record


def _answers(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise UserError(f"{where}: 'raw_answers' must be a non-empty list of strings")
    return value


def _idx(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: 'idx' must be an integer, got {value!r}")
    return value


def _completion_from_record(record: dict, where: str) -> Completion:
    recorded_score = None
    if "example" in record:  # official eval_multigpu.py output
        example = record["example"]
        if not isinstance(example, dict):
            raise UserError(f"{where}: 'example' must be a JSON object")
        recorded_score = record.get("score")
        record = {**example, **{k: v for k, v in record.items() if k not in ("example", "score")}}
    prediction = record.get("prediction", record.get("raw_prediction"))
    if not isinstance(prediction, str):
        raise UserError(f"{where}: missing 'prediction' (or 'raw_prediction') string")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string")
    answers = record.get("raw_answers", record.get("answers"))
    known = {"prediction", "raw_prediction", "prompt", "raw_answers", "answers", "idx"}
    return Completion(
        prediction=prediction,
        where=where,
        idx=_idx(record.get("idx"), where),
        prompt=prompt,
        raw_answers=_answers(answers, where),
        recorded_score=recorded_score,
        extra={k: v for k, v in record.items() if k not in known},
    )


def load_completions(paths: list[str]) -> list[Completion]:
    completions = [_completion_from_record(record, where) for path in paths for where, record in _read_jsonl(path)]
    if not completions:
        raise UserError(f"{', '.join(paths)}: no completions")
    return completions


def load_eval_data(path: str) -> list[EvalSample]:
    """Official eval JSONL: {"idx", "prompt", "raw_answers", "answers"} (datasets/eval/<task>.jsonl)."""
    samples, seen = [], set()
    for where, record in _read_jsonl(path):
        idx = _idx(record.get("idx"), where)
        if idx is None:
            raise UserError(f"{where}: missing 'idx'")
        if idx in seen:
            raise UserError(f"{where}: duplicate idx {idx}")
        seen.add(idx)
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: missing 'prompt' string")
        answers = _answers(record.get("raw_answers", record.get("answers")), where)
        if answers is None:
            raise UserError(f"{where}: missing 'raw_answers'")
        samples.append(EvalSample(idx=idx, prompt=prompt, raw_answers=answers, where=where))
    if not samples:
        raise UserError(f"{path}: no eval samples")
    return samples


def attach_eval_data(completions: list[Completion], samples: list[EvalSample]) -> list[Completion]:
    """Fill idx/prompt/references from the eval data; returns completions in eval-data order."""
    by_idx = {s.idx: s for s in samples}
    by_prompt: dict[str, EvalSample | None] = {}
    for sample in samples:  # a prompt that occurs twice cannot identify a record
        by_prompt[sample.prompt] = None if sample.prompt in by_prompt else sample
    matched: dict[int, Completion] = {}
    for completion in completions:
        if completion.idx is not None:
            sample = by_idx.get(completion.idx)
            if sample is None:
                raise UserError(f"{completion.where}: idx {completion.idx} is not in the eval data")
            if completion.prompt is not None and completion.prompt != sample.prompt:
                raise UserError(f"{completion.where}: prompt differs from eval record idx {sample.idx}")
        elif completion.prompt is not None:
            if completion.prompt not in by_prompt:
                raise UserError(f"{completion.where}: prompt matches no eval record")
            sample = by_prompt[completion.prompt]
            if sample is None:
                raise UserError(f"{completion.where}: prompt matches several eval records; add 'idx'")
        else:
            raise UserError(f"{completion.where}: needs 'idx' or 'prompt' to match the eval data")
        if completion.raw_answers is not None and completion.raw_answers[0] != sample.raw_answers[0]:
            raise UserError(f"{completion.where}: reference differs from eval record idx {sample.idx}")
        if sample.idx in matched:
            raise UserError(f"{completion.where}: eval record idx {sample.idx} answered twice "
                            f"(first at {matched[sample.idx].where})")
        completion.idx, completion.prompt, completion.raw_answers = sample.idx, sample.prompt, sample.raw_answers
        matched[sample.idx] = completion
    missing = [s.idx for s in samples if s.idx not in matched]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"completions answer {len(matched)} of {len(samples)} eval records; missing idx {shown}")
    return [matched[s.idx] for s in samples]


def require_references(completions: list[Completion]) -> None:
    for completion in completions:
        if completion.raw_answers is None:
            raise UserError(f"{completion.where}: no 'raw_answers'; pass --eval-data to supply the references")


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    """Write all records or nothing (atomic.atomic_write_file)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    atomic_write_file(path, write)
