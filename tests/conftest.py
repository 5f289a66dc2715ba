"""Fixtures shared by the whole suite: tiny HF DeepSeek checkpoints (made once per session) and a torchrun runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def run_torchrun(script, *args, nproc: int = 2, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun (gloo, one thread per rank); fail the test with the output on error or timeout."""
    # --standalone: torchrun binds its rendezvous store to a free port itself (no race between concurrent tests)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun timed out after {timeout}s (hang?): {cmd}\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}): {cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_tool(tool: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python tools/<tool>.py args` and return the completed process (never raises on non-zero exit)."""
    cmd = [sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(arch, **TinySpec fields) -> directory of a cached tiny HF checkpoint."""
    from megatron_esft.models.tiny import TinySpec, make_tiny_deepseek

    cache: dict[str, str] = {}

    def make(arch: str = "deepseek-v2", **fields) -> str:
        key = json.dumps([arch, fields], sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}") / "hf"
            cache[key] = make_tiny_deepseek(TinySpec(arch=arch, **fields), str(out))
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _reset_megatron_moe_globals():
    """Megatron-Core keeps MoE state in process globals (aux-loss tracker, aux-loss backward scale); tests build many
    models in one process, so each test starts from a clean slate (build_model does the same for real runs)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
