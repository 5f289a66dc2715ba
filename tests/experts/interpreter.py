"""Runs a script of tests/experts under Triton's CPU interpreter (a subprocess: Triton picks the interpreter when a
kernel is defined) and returns the JSON of its last `RESULT {json}` line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_under_interpreter(script: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2", PYTHONPATH=str(HERE.parents[1]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def break_kernel(monkeypatch, module) -> None:
    """Let `module`'s Triton kernel (pair_sum, fp8_triton_gemm, fp8_triton_quantize) fail to build on its next use,
    on a CPU too."""
    # Triton imported first: imported under the variable, its own jitted helpers would stay the interpreter's for
    # the rest of this process, and the ahead-of-time compilation tests could no longer compile
    pytest.importorskip("triton.language")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets `usable` say yes on a CPU

    def broken(*_):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(module, "_kernel", broken)
    monkeypatch.setattr(module, "_failed", False)
