"""The jobs of bench/gpu_esft.py's plans: the default plan, which keys each kind takes, and a memory cap that stands
in for a smaller GPU."""

from __future__ import annotations

import json

# the keys a job may have, per kind (a misspelt key would silently run the default on a scarce GPU machine)
_JOB_KEYS = {
    "check": set(),
    "gemm": {"tokens", "candidates"},
    "experts": {"tokens", "sources", "fp8_kernel", "fp8_quantizer"},
    "model": {"mode", "backend", "layers", "cache", "recompute", "mbs", "accum", "fusions", "doc_len", "permutation",
              "offload", "token_counts", "cuda_graphs", "manual_gc", "memory_trace", "fp8_kernel", "fp8_quantizer"},
}
_COMMON_KEYS = {"job", "profile", "memory_cap_gib"}


def job_problem(job) -> str | None:
    """What is wrong with a plan's job (one line), or None."""
    if not isinstance(job, dict) or job.get("job") not in _JOB_KEYS:
        return f"{json.dumps(job)}: \"job\" must be one of {sorted(_JOB_KEYS)}"
    unknown = set(job) - _JOB_KEYS[job["job"]] - _COMMON_KEYS
    if unknown:
        return f"{json.dumps(job)}: unknown key(s) {sorted(unknown)} for a {job['job']} job"
    missing = {"mode", "backend", "layers"} - set(job) if job["job"] == "model" else set()
    if missing:
        return f"{json.dumps(job)}: a model job needs {sorted(missing)}"
    return _candidates_problem(job)


def _candidates_problem(job) -> str | None:
    """A gemm job's "candidates": true, or a list of the Triton kernel's candidate labels."""
    names = job.get("candidates", False)
    if isinstance(names, bool):
        return None
    from megatron_esft.experts.fp8_triton_gemm import candidates

    try:
        labels = list(candidates())
    except ImportError:  # no Triton here: the job times no candidates anyway
        return None
    if not isinstance(names, list) or set(names) - set(labels):
        return f"{json.dumps(job)}: \"candidates\" must be true or a list of {labels}"
    return None


def cap_device_memory(gib) -> None:
    """A smaller GPU on a larger one: torch's caching allocator may reserve at most `gib` GiB (an OOM beyond it)."""
    import torch

    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def default_plan(full_layers, fft_layers):
    """Four parts, each one device command (`--part K/4`), most informative first (results are appended to
    results.jsonl as they come); every row is compared only with rows of its own part, so each part carries its own
    baseline (the default ESFT job at `fft_layers` layers)."""
    esft_small = {"job": "model", "mode": "esft", "backend": "bf16", "layers": fft_layers}
    return [
        # the fused kernels' and the permutations' effect: "auto" (the default) next to eager ("none"); the default
        # "experts" permutation next to the dispatcher's gather and Megatron's own
        [{"job": "check"}, {"job": "experts"}, dict(esft_small), dict(esft_small, fusions="none"),
         dict(esft_small, permutation="gather"), dict(esft_small, permutation="megatron")],
        # ESFT vs FFT; packed SFT batches as the trainer feeds them (per-document causal masks), SDPA / FlexAttention
        [dict(esft_small), dict(esft_small, mode="fft"), dict(esft_small, doc_len=512),
         dict(esft_small, doc_len=512, fusions=["swiglu", "rope", "linear_cross_entropy", "flex_attention"])],
        # the full V2-Lite depth: bf16 experts, FP8 without a weight cache, FP8 with the frozen experts' cache (fits
        # only with their bf16 weights in host memory)
        [dict(esft_small, layers=full_layers), dict(esft_small, layers=full_layers, backend="fp8", cache="none"),
         dict(esft_small, layers=full_layers, backend="fp8", cache="frozen", offload=True)],
        # FP8 against bf16 experts at 4 layers (and FP8 with the dispatcher's gather: the effect of quantizing before
        # the gather)
        [dict(esft_small), dict(esft_small, backend="fp8", cache="frozen"),
         dict(esft_small, backend="fp8", cache="frozen", permutation="gather")],
    ]
