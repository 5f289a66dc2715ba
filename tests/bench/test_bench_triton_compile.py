"""bench/bench_triton_compile.py prints, without a GPU, one row per autotuning candidate of the Triton FP8 grouped
GEMM, and one per hand-written FP8 quantizer, with the resources ptxas reports (docs/benchmarks.md quotes the
tables)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_the_table_has_a_spill_free_fp8_row_per_candidate():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_triton_compile.py"), "--capability", "90",
                           "--k", "1408"], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| sm_90a |") and "quantize" not in line]
    # the 15 candidates (six tiles by pointer and by TMA, three persistent TMA ones), compiled (not interpreted,
    # whatever the environment)
    assert len(rows) == 15, proc.stdout
    for cells in rows:
        registers, spills, mma, copies, tma = (int(cells[i].rstrip(" |")) for i in (6, 7, 9, 10, 11))
        assert 0 < registers <= 255 and spills == 0 and mma > 0 and copies > 0, cells
        assert (tma > 0) == cells[1].endswith("TMA"), cells
    # the hand-written FP8 quantizers: whole rows in registers without spills, 16-byte loads, hardware e4m3
    quantizers = [line.split(" | ") for line in proc.stdout.splitlines()
                  if line.startswith("| sm_90a |") and "quantize" in line]
    assert len(quantizers) == 6, proc.stdout
    for cells in quantizers:
        spills, loads, conversions, reciprocals = (int(cells[i].rstrip(" |")) for i in (6, 7, 8, 9))
        assert spills == 0 and loads > 0 and conversions > 0 and reciprocals >= 2, cells
