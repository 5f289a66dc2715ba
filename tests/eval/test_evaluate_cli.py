"""tools/evaluate.py scoring mode, run as users run it (subprocess): results, eval-data joining, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "evaluate.py")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def answer(intent_name, **slots):
    return json.dumps({"intent": intent_name, "slots": slots}, ensure_ascii=False)


EVAL = [
    {"idx": 0, "prompt": "User: 打开空调\n\nAssistant:", "raw_answers": [answer("HomeAppliance-Control", appliance="空调")]},
    {"idx": 1, "prompt": "User: 明天天气\n\nAssistant:", "raw_answers": [answer("Weather-Query", datetime_date="明天")]},
    {"idx": 2, "prompt": "User: 播放音乐\n\nAssistant:", "raw_answers": [answer("Music-Play")]},
]
for record in EVAL:
    record["answers"] = record["raw_answers"]


def test_official_results_file_json_summary():
    result = run("--task", "intent", "--completions",
                 os.path.join(FIXTURES, "official_intent_completions_token.jsonl"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["samples"], summary["correct"], summary["score"]) == (500, 380, 76.0)


def test_eval_data_join_by_idx_and_prompt(tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    completions = write_jsonl(tmp_path / "c.jsonl", [
        {"idx": 2, "prediction": ' {"intent": "Music-Play", "slots": {}}。'},          # right
        {"prompt": EVAL[0]["prompt"], "prediction": ' {"intent": "HomeAppliance-Control", "slots": {}}'},  # missing slot
        {"idx": 1, "prediction": ' {"intent": "Weather-Query", "slots": {"datetime_date": "明天"}}'},  # right
    ])
    out = tmp_path / "scored.jsonl"
    result = run("--task", "intent", "--completions", completions, "--eval-data", eval_path, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "score (x100)" in result.stdout and "66.67" in result.stdout
    records = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [(r["idx"], r["score"], r["verdict"]) for r in records] == [
        (0, 0, "wrong_slots"), (1, 1, "correct"), (2, 1, "correct")]
    assert records[0]["raw_answers"] == EVAL[0]["raw_answers"] and records[0]["prompt"] == EVAL[0]["prompt"]


def test_split_rank_files_are_merged(tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    rank0 = write_jsonl(tmp_path / "out.rank_0", [
        {"example": {"prompt": EVAL[0]["prompt"], "raw_prediction": " x", "raw_answers": EVAL[0]["raw_answers"]},
         "score": 0},
        {"example": {"prompt": EVAL[2]["prompt"], "raw_prediction": ' {"intent": "Music-Play"}',
                     "raw_answers": EVAL[2]["raw_answers"]}, "score": 1}])
    rank1 = write_jsonl(tmp_path / "out.rank_1", [
        {"example": {"prompt": EVAL[1]["prompt"], "raw_prediction": " y", "raw_answers": EVAL[1]["raw_answers"]},
         "score": 0}])
    result = run("--task", "intent", "--completions", rank0, rank1, "--eval-data", eval_path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["correct"] == 1


def expect_user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_eval_record_is_an_error_and_writes_nothing(tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    completions = write_jsonl(tmp_path / "c.jsonl", [{"idx": 0, "prediction": "x"}, {"idx": 1, "prediction": "y"}])
    out = tmp_path / "scored.jsonl"
    result = run("--task", "intent", "--completions", completions, "--eval-data", eval_path, "--output", str(out))
    expect_user_error(result, "2 of 3", "missing idx 2")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-") or p == "scored.jsonl"] == []


@pytest.mark.parametrize("records,fragments", [
    ([{"idx": 0, "prediction": "x"}, {"idx": 0, "prediction": "y"}, {"idx": 1, "prediction": "z"},
      {"idx": 2, "prediction": "w"}], ["c.jsonl:2", "answered twice"]),
    ([{"idx": 7, "prediction": "x"}], ["c.jsonl:1", "idx 7 is not in the eval data"]),
    ([{"idx": 0, "prediction": "x", "raw_answers": ["{}"]}], ["c.jsonl:1", "reference differs"]),
    ([{"idx": 0}], ["c.jsonl:1", "missing 'prediction'"]),
])
def test_bad_completions_with_eval_data(tmp_path, records, fragments):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    completions = write_jsonl(tmp_path / "c.jsonl", records)
    expect_user_error(run("--task", "intent", "--completions", completions, "--eval-data", eval_path), *fragments)


def test_malformed_line_and_missing_references(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "x", "raw_answers": ["{}"]}\n{not json\n', encoding="utf-8")
    expect_user_error(run("--task", "intent", "--completions", str(bad)), "bad.jsonl:2", "not valid JSON")
    no_refs = write_jsonl(tmp_path / "norefs.jsonl", [{"prediction": "x"}])
    expect_user_error(run("--task", "intent", "--completions", no_refs), "norefs.jsonl:1", "--eval-data")
    expect_user_error(run("--task", "intent", "--completions", str(tmp_path / "absent.jsonl")), "no such file")


def test_mode_selection_errors(tmp_path):
    expect_user_error(run("--task", "intent"), "exactly one of")
    expect_user_error(run("--task", "intent", "--load", str(tmp_path)), "--tokenizer", "--eval-data")
    # argparse's own errors are one line too (no usage dump): the tool uses megatron_esft's ArgumentParser
    expect_user_error(run("--task", "law"), "argument --task: invalid choice: 'law'")
