"""The top-p sweep runs real selection + ESFT training per p and tabulates what the training logs report."""

import csv
import json

from megatron_esft.checkpoint.convert import hf_to_mcore
from megatron_esft.parallel import ParallelConfig
from tests.conftest import REPO, run_tool


def test_sweep_two_thresholds(tiny_hf, tmp_path):
    hf = tiny_hf("deepseek-v2")
    hf_to_mcore(hf, str(tmp_path / "base"), ParallelConfig())
    data = REPO / "examples" / "tiny" / "data" / "intent_train.jsonl"
    scores = {"token_scores": {}, "gate_scores": {}}
    for layer in ("1", "2"):  # a fixed, skewed score table: expert e gets weight 2^-e
        raw = {str(e): 0.5 ** (e + 1) for e in range(8)}
        scores["token_scores"][layer] = raw
        scores["gate_scores"][layer] = {k: v / 2 for k, v in raw.items()}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    proc = run_tool("sweep_top_p", "--scores", tmp_path / "scores.json", "--method", "token", "--top-p", "0.4", "0.7",
                    "--load", tmp_path / "base", "--out", tmp_path / "sweep", "--", "--train-data", data,
                    "--split", "80,20", "--eval-interval", "2", "--train-iters", "2", "--micro-batch-size", "2",
                    "--seq-length", "128", "--lr", "1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["p"] for r in rows] == ["0.4", "0.7"]
    # top-p over 2^-(e+1): p=0.4 takes experts {0} per layer, p=0.7 takes {0, 1}
    assert [int(r["experts selected"]) for r in rows] == [2, 4]
    assert int(rows[1]["trainable params"]) == 2 * int(rows[0]["trainable params"]) > 0
    assert all(float(r["validation loss"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0


def test_bad_training_arguments_fail_before_anything_is_written(tiny_hf, tmp_path):
    """pretrain_esft.py's arguments after `--` are parsed and validated up front: one line, exit 2, no output
    directory (they used to fail in the first run, after its selection was written)."""
    hf = tiny_hf("deepseek-v2")
    hf_to_mcore(hf, str(tmp_path / "base"), ParallelConfig())
    (tmp_path / "scores.json").write_text(json.dumps({"token_scores": {"1": {"0": 1.0}, "2": {"0": 1.0}},
                                                      "gate_scores": {"1": {"0": 1.0}, "2": {"0": 1.0}}}))
    common = ["--train-data", "x.jsonl", "--seq-length", "64", "--lr", "1e-3", "--train-iters", "2"]
    cases = [
        (["--train-iters", "2"], "error: after '--': pretrain_esft.py: the following arguments are required: "
                                 "--train-data, --seq-length, --lr"),
        ([*common, "--save=elsewhere"], "error: after '--': --save is set by the sweep for each run; leave it out"),
        ([*common, "--global-batch-size", "3", "--micro-batch-size", "2"],
         "error: after '--': --global-batch-size 3 is not a multiple of --micro-batch-size 2 x data-parallel size 1"),
    ]
    out = tmp_path / "sweep"
    for train_args, message in cases:
        proc = run_tool("sweep_top_p", "--scores", tmp_path / "scores.json", "--method", "token", "--top-p", "0.5",
                        "--load", tmp_path / "base", "--out", out, "--", *train_args)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message], proc.stderr
        assert not out.exists()
