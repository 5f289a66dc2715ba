"""The one place where megatron_esft patches Megatron-Core.

`apply()` is idempotent and must run before a Megatron-Core model is built (every entry point calls it through
`megatron_esft.parallel.initialize`). It applies two groups of fixes:

* `no_te`: Megatron-Core 0.16.1 bugs that fire whenever Transformer Engine is *not importable* (CPU machines and GPU
  machines without TE alike): the router's `te_general_gemm`, MLA's `HAVE_TE`, sequence-parallel torch norms and
  MLA's rope-key gradient under TP. Each fix is a no-op when TE is present.
* `cpu`: everything Megatron-Core needs to run on a CPU-only torch build with the gloo backend (RNG tracker, CUDA
  streams/events, ``current_device``, hard-coded ``device='cuda'`` tensors, alltoall split sizes). Applied only
  when CUDA is absent; on a GPU nothing here is touched.

Every patch is documented next to its code with the Megatron-Core 0.16.1 line it works around, and recorded in
`PATCHED` so `python -m megatron_esft.compat` can list what is active.
"""

from __future__ import annotations

import importlib.util

import torch

PATCHED: list[str] = []
_APPLIED = False


def have_transformer_engine() -> bool:
    """True when Transformer Engine can be imported for real (never imports a half-installed TE twice)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a half-installed TE raises RuntimeError, not ImportError
        return False
    return True


def apply() -> list[str]:
    """Apply every needed compat patch once; returns the list of active patches."""
    global _APPLIED
    if _APPLIED:
        return PATCHED
    from . import no_te

    no_te.apply(PATCHED)
    if not torch.cuda.is_available():
        from . import cpu

        cpu.apply(PATCHED)
    _APPLIED = True
    return PATCHED
