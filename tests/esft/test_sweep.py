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
