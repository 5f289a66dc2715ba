"""tools/select_experts.py and tools/plot_expert_scores.py end to end: outputs, flags, one-line errors."""

import json
import subprocess
import sys

import pytest
from routing_fixtures import INTENT_CONFIG, INTENT_LOGS, INTENT_SUMMARY, REPO, needs_fixtures

SELECT = str(REPO / "tools" / "select_experts.py")
PLOT = str(REPO / "tools" / "plot_expert_scores.py")


def run(tool, *args):
    return subprocess.run([sys.executable, tool, *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_user_error(proc, fragment, out):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@needs_fixtures
@pytest.mark.parametrize("source", [["--scores", INTENT_SUMMARY.parent], ["--official-logs", INTENT_LOGS]])
def test_reproduces_official_intent_config_byte_for_byte(tmp_path, source):
    # from summary.json, and from the raw routing logs (rounded to 4 decimals like the official pipeline)
    out = tmp_path / "intent.json"
    proc = run(SELECT, *source, "--method", "token", "--top-p", "0.2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == INTENT_CONFIG.read_bytes()
    if source[0] == "--official-logs":  # at full precision layer 17's rounded tie resolves the other way
        proc = run(SELECT, *source, "--method", "token", "--round-decimals", "none", "--out", out)
        assert proc.returncode == 0 and json.loads(out.read_text())["experts"]["17"][-1] == 45


@needs_fixtures
def test_official_logs_flags_budget_random_control(tmp_path):
    v2_lite = tmp_path / "config.json"
    v2_lite.write_text(json.dumps({"num_hidden_layers": 27, "first_k_dense_replace": 1, "n_routed_experts": 64,
                                   "num_experts_per_tok": 6, "hidden_size": 2048, "moe_intermediate_size": 1408}))
    out = tmp_path / "gate.json"
    proc = run(SELECT, "--official-logs", INTENT_LOGS, "--model", tmp_path, "--method", "gate", "--budget", "1.07e9",
               "--random-control", "--seed", "5", "--shared-experts", "--non-expert-modules", "--out", out)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(out.read_text())
    assert cfg["shared_experts"] is True and cfg["non_expert_modules"] is True
    n = sum(map(len, cfg["experts"].values()))
    assert n == 123 == 1.07e9 // (3 * 2048 * 1408) and set(cfg["experts"]) == {str(i) for i in range(1, 27)}
    assert "p=0.1013" in proc.stdout and "random control" in proc.stdout

    png = tmp_path / "h.png"
    proc = run(PLOT, "--scores", INTENT_SUMMARY, "--method", "gate", "--expert-config", out, "--out", png)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fixtures
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "token", "--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--method", "token", "--top-p", "1.2"], "--top-p: must be in (0, 1]"),
        (["--method", "weight"], "unknown scoring method 'weight'"),
        (["--method", "token", "--model", "TINY"], "scores are from a different model"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tmp_path, args, fragment):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "first_k_dense_replace": 1,
                                                  "n_routed_experts": 8, "num_experts_per_tok": 2}))
    args = [str(tiny) if a == "TINY" else a for a in args]
    out = tmp_path / "cfg.json"
    assert_user_error(run(SELECT, "--scores", INTENT_SUMMARY, *args, "--out", out), fragment, out)


def test_mismatched_log_lines_one_line_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "expert_weights_1.txt").write_text("0\t1\t\t0.5\t0.25\n0\t1\t2\t\t0.5\t0.25\n")
    out = tmp_path / "cfg.json"
    proc = run(SELECT, "--official-logs", logs, "--topk", "2", "--method", "token", "--out", out)
    assert_user_error(proc, "expert_weights_1.txt:2: 3 expert ids but 2 gate weights", out)
