"""Intent scoring = the official ESFT IntentEvaluator (benchmarks.py @ 579a771).

Two independent references:
  * the 1000 completions the ESFT authors released (results/completions/{token,gate}/intent.jsonl), each carrying the
    score the official evaluator gave it (prompts dropped to keep the fixture small; see fixtures/README.md);
  * hand-labelled cases below: every expected 0/1 is written down from reading the official code, not computed by
    our scorer, and the task score is recomputed from those labels.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_esft.errors import UserError
from megatron_esft.eval import intent
from megatron_esft.eval.completions import load_completions
from megatron_esft.eval.scoring import score_completions

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

GOLD = json.dumps({"intent": "Alarm-Update", "slots": {"datetime_date": ["17号", "18号"], "notes": "买眼镜"}},
                  ensure_ascii=False)
OK = '{"intent": "Alarm-Update", "slots": {"datetime_date": ["17号", "18号"], "notes": "买眼镜"}}'

# (name, raw prediction, expected official score, our verdict)
CASES = [
    ("exact, leading space + trailing 。 (model output style)", " " + OK + "。", 1, intent.CORRECT),
    ("keys and slots in another order", '{"slots": {"notes": "买眼镜", "datetime_date": ["17号", "18号"]}, '
     '"intent": "Alarm-Update"}', 1, intent.CORRECT),
    ("list order differs (sorted before comparing)", OK.replace('["17号", "18号"]', '["18号", "17号"]'), 1,
     intent.CORRECT),
    ("spaces inside prediction values are removed", OK.replace("买眼镜", "买 眼 镜").replace('"17号"', '"17 号"'), 1,
     intent.CORRECT),
    ("compact JSON, leading 。 and trailing periods", "。" + OK.replace(": ", ":").replace(", ", ",") + "..", 1,
     intent.CORRECT),
    ("first non-empty line only; rest ignored", "\n\n" + OK + "\n\nExplanation: done", 1, intent.CORRECT),
    ("```json fenced block", "```json\n" + OK + "\n```", 1, intent.CORRECT),
    ("```json fence after some text", "答案：```json\n" + OK + "\n```\nmore", 1, intent.CORRECT),
    ("wrong slot value", OK.replace("买眼镜", "买眼睛"), 0, intent.WRONG_SLOTS),
    ("missing slot", '{"intent": "Alarm-Update", "slots": {"notes": "买眼镜"}}', 0, intent.WRONG_SLOTS),
    ("extra slot", OK.replace('"notes"', '"datetime_time": "上午", "notes"'), 0, intent.WRONG_SLOTS),
    ("no slots at all", '{"intent": "Alarm-Update"}', 0, intent.WRONG_SLOTS),
    ("list value given as a string", OK.replace('["17号", "18号"]', '"17号,18号"'), 0, intent.WRONG_SLOTS),
    ("list with a duplicate element", OK.replace('["17号", "18号"]', '["17号", "18号", "18号"]'), 0,
     intent.WRONG_SLOTS),
    ("slot key differs by a space (keys are not normalised)", OK.replace('"notes"', '"notes "'), 0,
     intent.WRONG_SLOTS),
    ("wrong intent", OK.replace("Alarm-Update", "Alarm-Query"), 0, intent.WRONG_INTENT),
    ("intent with a trailing space (intent is not normalised)", OK.replace('"Alarm-Update"', '"Alarm-Update "'), 0,
     intent.WRONG_INTENT),
    ("truncated JSON (max_new_tokens hit)", OK[:40], 0, intent.UNPARSEABLE),
    ("single-quoted pseudo-JSON", OK.replace('"', "'"), 0, intent.UNPARSEABLE),
    ("empty generation", "   \n ", 0, intent.UNPARSEABLE),
    ("plain text", "我不知道", 0, intent.UNPARSEABLE),
    ("```json without a closing fence -> '{}' -> no intent", "```json\n" + OK, 0, intent.WRONG_INTENT),
    ("``` fence without 'json' is not unwrapped", "```\n" + OK + "\n```", 0, intent.UNPARSEABLE),
    ("。 followed by a space on the first line is not stripped", OK + "。 \nmore", 0, intent.UNPARSEABLE),
    ("slot value is a number", OK.replace('"买眼镜"', "5"), 0, intent.BAD_SLOTS),
    ("slots is a list", '{"intent": "Alarm-Update", "slots": ["买眼镜"]}', 0, intent.BAD_SLOTS),
    # the official code raises on these and stops the whole run; they cannot be right, so we score 0
    ("JSON null (official: AttributeError)", "null", 0, intent.UNPARSEABLE),
    ("JSON list (official: AttributeError)", "[" + OK + "]", 0, intent.UNPARSEABLE),
    ("empty ```json block (official: IndexError)", "```json\n```", 0, intent.UNPARSEABLE),
]


@pytest.mark.parametrize("name,raw,expected,verdict", CASES, ids=[c[0] for c in CASES])
def test_single_prediction(name, raw, expected, verdict):
    result = intent.score_intent(raw, GOLD)
    assert (result.score, result.verdict) == (expected, verdict)


def test_reference_side_quirks():
    # a reference value with a space can never be matched: only prediction values lose their spaces
    gold = '{"intent": "Music-Play", "slots": {"song": "let it be"}}'
    assert intent.score_intent('{"intent": "Music-Play", "slots": {"song": "let it be"}}', gold).score == 0
    # no slots in the reference: an empty or absent prediction slot object is right
    gold = '{"intent": "Calendar-Query"}'
    assert intent.score_intent('{"intent": "Calendar-Query", "slots": {}}', gold).score == 1
    assert intent.score_intent('{"intent": "Calendar-Query"}', gold).score == 1
    # the official comparison is on str(tuple(...)) of list values, so this string equals the list ["a"]
    gold = """{"intent": "X", "slots": {"k": "('a',)"}}"""
    assert intent.score_intent('{"intent": "X", "slots": {"k": ["a"]}}', gold).score == 1


def test_bad_reference_is_a_user_error():
    with pytest.raises(UserError, match="not valid JSON"):
        intent.score_intent(OK, "{oops")
    with pytest.raises(UserError, match="slot 'k'"):
        intent.score_intent(OK, '{"intent": "X", "slots": {"k": {"a": 1}}}')


def test_task_score_from_hand_labels(tmp_path):
    path = tmp_path / "completions.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, (_, raw, _, _) in enumerate(CASES):
            handle.write(json.dumps({"idx": i, "prediction": raw, "raw_answers": [GOLD]}, ensure_ascii=False) + "\n")
    summary, records = score_completions(load_completions([str(path)]), "intent")
    expected_correct = sum(expected for _, _, expected, _ in CASES)
    assert summary["samples"] == len(CASES)
    assert summary["correct"] == expected_correct == 8
    assert summary["score"] == pytest.approx(100.0 * 8 / len(CASES), abs=1e-4)
    assert [r["score"] for r in records] == [expected for _, _, expected, _ in CASES]
    assert summary["verdicts"][intent.UNPARSEABLE] == sum(v == intent.UNPARSEABLE for *_, v in CASES)


@pytest.mark.parametrize("variant,paper_repo_score", [("token", 76.0), ("gate", 80.0)])
def test_official_released_completions(variant, paper_repo_score):
    """Every one of the 500 per-sample scores the official evaluator recorded is reproduced, and so is the mean."""
    completions = load_completions([os.path.join(FIXTURES, f"official_intent_completions_{variant}.jsonl")])
    summary, records = score_completions(completions, "intent")
    assert len(completions) == 500
    mismatches = [c.idx for c, r in zip(completions, records) if r["score"] != c.recorded_score]
    assert mismatches == []
    assert summary["score"] == paper_repo_score
