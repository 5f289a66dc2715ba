"""Score a list of completions for a task; the one place that maps task names to scorers.

Only `intent` is scored locally: the official Summary/Law/Translation metrics are GPT-4 judgements
(`benchmarks.GPT4Evaluator`) and need an external API, so they are out of scope here.
"""

from __future__ import annotations

from megatron_esft.errors import UserError
from megatron_esft.eval import intent
from megatron_esft.eval.completions import Completion, require_references

TASKS = ("intent",)


def score_completions(completions: list[Completion], task: str) -> tuple[dict, list[dict]]:
    """Returns (summary, per-sample records in our completions format plus "score" and "verdict")."""
    if task not in TASKS:
        raise UserError(f"--task {task}: only {', '.join(TASKS)} can be scored locally "
                        "(summary/law/translation are GPT-4 judged in the official code)")
    require_references(completions)
    results, records = [], []
    for completion in completions:
        result = intent.score_intent(completion.prediction, completion.raw_answers[0], where=completion.where)
        results.append(result)
        record = {"idx": completion.idx, "prompt": completion.prompt, "prediction": completion.prediction,
                  "raw_answers": completion.raw_answers, "score": result.score, "verdict": result.verdict}
        records.append({k: v for k, v in record.items() if v is not None})
    return intent.summarize(results), records
