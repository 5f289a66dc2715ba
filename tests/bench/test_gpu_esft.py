"""bench/gpu_esft.py and bench/gpu_session.sh, the scripts a scarce GPU session runs (docs/benchmarks.md): every job
of their plans is one the benchmark knows, and a graph job and an experts job run at toy size on the CPU and report."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def gpu_esft():
    sys.path.insert(0, str(BENCH))  # the script's helpers (_gpu_experts, ...) sit beside it
    try:
        spec = importlib.util.spec_from_file_location("gpu_esft", BENCH / "gpu_esft.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def session_plan():
    text = (BENCH / "gpu_session.sh").read_text()
    return json.loads(re.search(r"PLAN=\$\{PLAN:-'(.*?)'\}", text, re.S).group(1))


def test_the_session_plan_and_the_default_plan_hold_known_jobs_only(gpu_esft):
    plan = session_plan()
    assert len(plan) >= 5 and any(job.get("memory_cap_gib") for job in plan)
    default = [job for group in gpu_esft.default_plan(27, 4) for job in group]
    for job in plan + default:
        assert gpu_esft.job_problem(job) is None, job
    # what the check is for: a misspelt key would run the default on the GPU machine
    assert "unknown key(s) ['token_count']" in gpu_esft.job_problem(dict(plan[0], token_count="device"))
    assert "needs ['layers']" in gpu_esft.job_problem({"job": "model", "mode": "esft", "backend": "bf16"})
    assert '"job" must be one of' in gpu_esft.job_problem({"job": "nodel"})


def _bench(*args, out, **env_extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2", **env_extra)
    return subprocess.run([sys.executable, str(BENCH / "gpu_esft.py"), *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(450)
def test_a_graph_job_and_an_experts_job_run_on_the_cpu_and_report(tmp_path):
    plan = [{"job": "model", "mode": "esft", "backend": "fp8", "cache": "frozen", "layers": 4, "token_counts": "device",
             "cuda_graphs": "full_iteration", "memory_cap_gib": 78.5, "memory_trace": True},
            {"job": "experts", "sources": ["tokens, device counts"]}]
    proc = _bench("--tiny", "--seq", "64", "--warmup", "2", "--iters", "1", "--plan", json.dumps(plan), out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r], rows
    (model,) = [r for r in rows if r["kind"] == "model"]
    # on a CPU the graph runs eagerly through its static buffers (nothing captured) and the frozen weights stay put
    assert model["cuda_graphs"] == "full_iteration" and model["graph_captured"] is False
    assert model["frozen_bit_identical"] is True and model["trainable_changed"] == "6/6"
    assert model["memory_cap_gib"] == 78.5 and model["loss_first"] > model["loss_last"]
    assert model["memory_trace"] is None  # the allocator history needs CUDA
    experts = [r for r in rows if r["kind"] == "experts"]
    assert [(r["backend"], r["source"]) for r in experts] == [("bf16", "tokens, device counts"),
                                                               ("fp8", "tokens, device counts")]
    assert {r["fp8_kernel"] for r in rows} == {"torch"}
    report = _bench("--report", str(tmp_path / "results.jsonl"), out=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "the whole iteration in a CUDA graph (not captured), GPU memory capped at 78.5 GiB" in report.stdout
    assert "| esft fp8 fused SwiGLU (weight cache: frozen) | tokens, device counts (experts permute) |" in report.stdout


def test_a_plan_with_an_unknown_key_stops_before_any_job(tmp_path):
    plan = [{"job": "model", "mode": "esft", "backend": "bf16", "layers": 4, "token_count": "device"}]
    proc = _bench("--tiny", "--plan", json.dumps(plan), out=tmp_path)
    assert proc.returncode == 2 and "unknown key(s) ['token_count'] for a model job" in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()
    plan = [{"job": "gemm", "candidates": ["TMA 64x64x128 w4 s5"]}]
    proc = _bench("--tiny", "--plan", json.dumps(plan), out=tmp_path)
    assert proc.returncode == 2 and '"candidates" must be true or a list of [\'pointer 128x128x128 w8 s3\'' in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.timeout(300)
def test_the_gemm_job_and_the_triton_fp8_kernel_run_under_the_interpreter(tmp_path):
    """Triton's CPU interpreter stands in for a GPU: the gemm job times the Triton FP8 kernel next to bf16 and the
    emulation of torch's FP8 kernel and the hand-written quantizers next to the default ones, and an experts job with
    "fp8_kernel" and "fp8_quantizer": "triton" runs its GEMMs and quantizers through them."""
    plan = [{"job": "gemm", "tokens": 16, "candidates": ["TMA 64x64x128 w4 s4", "pointer 64x64x128 w4 s4"]},
            {"job": "experts", "sources": ["tokens, device counts"], "fp8_kernel": "triton", "fp8_quantizer": "triton",
             "tokens": 16}]
    proc = _bench("--tiny", "--warmup", "1", "--iters", "1", "--plan", json.dumps(plan), out=tmp_path,
                  TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r], rows
    gemms = [r for r in rows if r["kind"] == "gemm"]
    # each autotuning candidate launched alone, for each of the four GEMMs
    candidates = [r for r in rows if r["kind"] == "gemm_candidate"]
    assert len(candidates) == 4 * 2 and all(r["ms"] > 0 for r in candidates), candidates
    assert {r["config"] for r in candidates} == {"TMA 64x64x128 w4 s4", "pointer 64x64x128 w4 s4"}
    assert {(r["gemm"], r["kernel"]) for r in gemms} == {
        (gemm, kernel) for gemm in ("fc1 forward", "fc2 forward", "fc2 input gradient", "fc1 input gradient")
        for kernel in ("bf16", "fp8 emulated", "fp8 triton")}
    for r in gemms:
        assert r["rows"] == 64 and r["ms"] > 0
        if r["kernel"] == "fp8 triton":  # the interpreter truncates to bf16 where the emulation rounds
            assert 0 < r["rel_vs_fp8_torch"] < 2.0 ** -7, r
    # the FP8 quantization kernels alone, with the bandwidth of a copy of as many bytes; each also hand-written
    quantizers = [r for r in rows if r["kind"] == "quantizer"]
    assert len(quantizers) == 10 and all(r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 for r in quantizers)
    assert [r["implementation"] for r in quantizers].count("hand-written Triton") == 5, quantizers
    experts = [r for r in rows if r["kind"] == "experts"]
    assert [r["backend"] for r in experts] == ["bf16", "fp8"] and {r["fp8_kernel"] for r in experts} == {"triton"}
    assert {r["fp8_quantizer"] for r in experts} == {"triton"}
    report = _bench("--report", str(tmp_path / "results.jsonl"), out=tmp_path)
    assert "| all four (forward + input gradient) | fp8 triton |" in report.stdout, report.stdout
    assert "| Triton FP8 candidate (64 rows) | fc1 forward ms |" in report.stdout, report.stdout
    assert "| FP8 quantization kernel (64 routed rows) | kernel | ms | MB moved |" in report.stdout, report.stdout
    assert "| hand-written Triton |" in report.stdout, report.stdout
    assert "(weight cache: frozen), Triton GEMMs, Triton quantizers | tokens, device counts" in report.stdout, \
        report.stdout
