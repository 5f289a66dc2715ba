"""Intent task scoring with the semantics of the official ESFT `benchmarks.IntentEvaluator` (deepseek-ai/ESFT @ 579a771).

A sample scores 1 when the predicted JSON has exactly the reference `intent` AND exactly the reference slot set, else 0;
the task score is the mean x 100 (the paper's Table 1 "Intent" column).

Post-processing of the raw generated text, in the official order:
  1. strip whitespace; an empty prediction becomes the text "None" (which then fails to parse);
  2. strip "." and "。" from both ends;
  3. if the text contains "```json", keep what lies between it and the next "```"; with no closing fence the prediction
     becomes "{}" (which parses, but has no intent, so it scores 0);
  4. if the text contains "\\n", keep the first non-empty line (a line of spaces is non-empty: split on "\\n" only);
  5. strip "." and "。" from both ends again (whitespace is NOT stripped here); then `json.loads`.

Comparison (official quirks kept on purpose, so scores match the official numbers):
  * `intent`: Python `==` on the raw JSON values (no whitespace normalisation); a missing key on either side is "".
  * slots are compared as sets of (key, value) pairs. A string value is kept as is on the reference side and has ALL
    spaces removed on the prediction side (so a reference value containing a space can never match). A list value
    becomes `str(tuple(sorted(str(x) ...)))` (spaces removed from each prediction element), so list order does not
    matter but duplicates and list-vs-string do. Keys are never normalised. Missing and extra slots both make it wrong.

Where the official code raises and stops the whole evaluation (an empty first line after step 3/4, a prediction that
parses to a non-object such as `null` or `[..]`), we score the sample 0 instead: those cannot be right answers, and
one bad generation must not abort a 500-sample evaluation. Official behaviour on every input it does not crash on is
reproduced exactly (tests/eval/test_intent.py checks all 1000 released official completions against their recorded
scores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_esft.errors import UserError

# Verdicts, in the order they are decided. Only CORRECT scores 1.
CORRECT = "correct"
UNPARSEABLE = "unparseable"  # post-processed text is not JSON, or not a JSON object
BAD_SLOTS = "bad_slots"  # "slots" is not an object, or a slot value is neither a string nor a list
WRONG_INTENT = "wrong_intent"
WRONG_SLOTS = "wrong_slots"  # intent right, slot set differs (missing, extra or different values)
VERDICTS = (CORRECT, UNPARSEABLE, BAD_SLOTS, WRONG_INTENT, WRONG_SLOTS)

_PERIODS = ".。"


@dataclass(frozen=True)
class IntentResult:
    score: int  # 1 or 0
    verdict: str  # one of VERDICTS
    parsed_text: str | None  # the post-processed prediction text that went to json.loads (None: nothing left)
    intent_match: bool = False  # the intent alone was right (a diagnostic; not the official metric)


def extract_prediction_text(raw_prediction: str) -> str | None:
    """Post-process raw generated text like the official evaluator. None where the official code would crash."""
    text = raw_prediction.strip()
    if not text:
        text = "None"
    text = text.strip(_PERIODS)
    fence = "```json"
    if fence in text:
        body = text[text.index(fence) + len(fence) :]
        closing = body.find("```")
        text = body[:closing] if closing >= 0 else "{}"
    if "\n" in text:
        lines = [line for line in text.split("\n") if line]
        if not lines:
            return None
        text = lines[0]
    return text.strip(_PERIODS)


def _list_slot_value(values: list, strip_spaces: bool) -> str:
    # The official code compares the *string* form of a sorted tuple; keep that so e.g. duplicates still count.
    items = [str(v).replace(" ", "") if strip_spaces else str(v) for v in values]
    return str(tuple(sorted(items)))


def reference_slot_set(reference: dict, where: str = "reference") -> set:
    slots = reference.get("slots", {})
    if not isinstance(slots, dict):
        raise UserError(f"{where}: 'slots' must be a JSON object, got {type(slots).__name__}")
    pairs = set()
    for key, value in slots.items():
        if isinstance(value, list):
            pairs.add((key, _list_slot_value(value, strip_spaces=False)))
        elif isinstance(value, dict):
            raise UserError(f"{where}: slot {key!r} must be a string or a list, got an object")
        else:
            pairs.add((key, value))
    return pairs


def _prediction_slot_set(prediction: dict) -> set | None:
    """None where the official code fails while processing the slots (it scores those 0)."""
    slots = prediction.get("slots", {})
    if not isinstance(slots, dict):
        return None
    pairs = set()
    for key, value in slots.items():
        if isinstance(value, list):
            pairs.add((key, _list_slot_value(value, strip_spaces=True)))
        elif isinstance(value, str):
            pairs.add((key, value.replace(" ", "")))
        else:  # numbers, booleans, null, objects have no .replace in the official code
            return None
    return pairs


def parse_reference(raw_answer: str, where: str = "reference") -> dict:
    try:
        reference = json.loads(raw_answer)
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{where}: reference answer is not valid JSON ({exc})") from None
    if not isinstance(reference, dict):
        raise UserError(f"{where}: reference answer must be a JSON object, got {type(reference).__name__}")
    reference_slot_set(reference, where)  # validate once, with a clear message
    return reference


def score_intent(raw_prediction: str, raw_answer: str, where: str = "reference") -> IntentResult:
    """Score one generated text against one reference answer (the eval record's `raw_answers[0]`)."""
    reference = parse_reference(raw_answer, where)
    text = extract_prediction_text(raw_prediction)
    if text is None:
        return IntentResult(0, UNPARSEABLE, None)
    try:
        prediction = json.loads(text)
    except json.JSONDecodeError:
        return IntentResult(0, UNPARSEABLE, text)
    if not isinstance(prediction, dict):
        return IntentResult(0, UNPARSEABLE, text)
    intent_match = bool(prediction.get("intent", "") == reference.get("intent", ""))
    predicted_slots = _prediction_slot_set(prediction)
    if predicted_slots is None:
        return IntentResult(0, BAD_SLOTS, text, intent_match)
    if not intent_match:
        return IntentResult(0, WRONG_INTENT, text, intent_match)
    if predicted_slots != reference_slot_set(reference, where):
        return IntentResult(0, WRONG_SLOTS, text, intent_match)
    return IntentResult(1, CORRECT, text, intent_match)


def summarize(results: list[IntentResult]) -> dict:
    """Task-level numbers. `score` is the official metric (mean x 100)."""
    n = len(results)
    if n == 0:
        raise UserError("no samples to score")
    counts = {verdict: 0 for verdict in VERDICTS}
    for result in results:
        counts[result.verdict] += 1
    correct = counts[CORRECT]
    return {
        "task": "intent",
        "samples": n,
        "correct": correct,
        "score": round(100.0 * correct / n, 4),
        # diagnostics beyond the official metric: intent right regardless of slots, and why samples were wrong
        "intent_accuracy": round(100.0 * sum(result.intent_match for result in results) / n, 4),
        "verdicts": counts,
    }
