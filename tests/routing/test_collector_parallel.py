"""Routing statistics are layout-independent: 1 rank == 2 ranks for DP=2, EP=2, TP=2+SP, TP=2 (no SP), PP=2.

The reference run (1 rank, in the test process) saves its float64 tiny model as a dist checkpoint; the 2-rank runs load it under each
layout. Same micro-batches (with padding) everywhere: counts must be identical, gate sums equal to 1e-9 relative.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "collect_parallel_main.py")


def _run(cmd):
    # drop the rendezvous variables an in-process test may have set (the child must start its own group)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_one_rank_equals_two_ranks_in_every_layout(tmp_path):
    from collect_parallel_main import collect

    collect("reference", str(tmp_path))  # in this process (1 rank): saves the checkpoint, writes reference.json
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, "parallel",
          str(tmp_path)])
    ref = json.loads((tmp_path / "reference.json").read_text())
    total = sum(ref["num_tokens"].values()) // 3
    assert ref["num_tokens"] == {"1": total, "2": total, "3": total} and 0 < total < 6 * 2 * 16  # padding excluded
    per_rank = {}
    for layout in ("dp2", "ep2", "tp2sp", "tp2", "pp2"):
        got = json.loads((tmp_path / f"{layout}.json").read_text())
        assert got["counts"] == ref["counts"], layout
        assert got["num_tokens"] == ref["num_tokens"], layout
        for layer, row in ref["gate_sums"].items():
            np.testing.assert_allclose([got["gate_sums"][layer][e] for e in row], list(row.values()),
                                       rtol=1e-9, err_msg=layout)
        per_rank[layout] = got["data"]["per_rank"]  # [tokens counted, MoE layers owned, local experts] per rank
    # the layouts really were parallel
    assert [r[0] for r in per_rank["dp2"]] != [total, total] and sum(r[0] for r in per_rank["dp2"]) == total
    assert [r[2] for r in per_rank["ep2"]] == [4, 4] and sum(r[0] for r in per_rank["ep2"]) == total
    assert sum(r[0] for r in per_rank["tp2sp"]) == total and 0 < per_rank["tp2sp"][1][0] < total
    assert [r[0] for r in per_rank["tp2"]] == [total, 0]  # without SP both TP ranks route everything: count once
    assert [r[1] for r in per_rank["pp2"]] == [1, 2]  # stage 0: dense layer 0 + MoE layer 1; stage 1: layers 2, 3
