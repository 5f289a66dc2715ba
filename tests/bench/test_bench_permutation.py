"""bench/bench_permutation.py runs on the CPU at toy sizes and prints its tables; the row gathers it times (element-
wise and as 8-byte words) give the same bits."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_tables_print_and_the_gathers_agree_bit_for_bit():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_permutation.py"), "--tokens", "64",
                           "--hidden", "64", "--experts", "8", "--topk", "2", "--warmup", "1", "--iters", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "permutation, fwd+bwd" in proc.stdout and "sum of each token's k rows" in proc.stdout, proc.stdout
    gathers = [line for line in proc.stdout.splitlines() if "rows, " in line and "|" in line]
    assert len(gathers) == 4 and all(line.rstrip(" |").endswith("True") for line in gathers), proc.stdout
