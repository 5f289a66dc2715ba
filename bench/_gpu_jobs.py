"""The jobs of bench/gpu_esft.py's plans: which keys each kind takes, and a memory cap that stands in for a smaller
GPU."""

from __future__ import annotations

import json

# the keys a job may have, per kind (a misspelt key would silently run the default on a scarce GPU machine)
_JOB_KEYS = {
    "check": set(),
    "experts": {"tokens", "sources"},
    "model": {"mode", "backend", "layers", "cache", "recompute", "mbs", "accum", "fusions", "doc_len", "permutation",
              "offload", "token_counts", "cuda_graphs", "manual_gc", "memory_trace"},
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
    return f"{json.dumps(job)}: a model job needs {sorted(missing)}" if missing else None


def cap_device_memory(gib) -> None:
    """A smaller GPU on a larger one: torch's caching allocator may reserve at most `gib` GiB (an OOM beyond it)."""
    import torch

    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
