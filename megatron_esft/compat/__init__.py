"""The one place where megatron_esft patches Megatron-Core.

`apply()` is idempotent and must run before a Megatron-Core model is built (every entry point calls it through
`megatron_esft.parallel.initialize`). It applies three groups of fixes:

* `no_te`: Megatron-Core 0.16.1 bugs that fire whenever Transformer Engine is *not importable* (CPU machines and GPU
  machines without TE alike): the router's `te_general_gemm`, MLA's `HAVE_TE` and selective recompute's FP8 branch.
  Skipped when TE imports.
* `local_spec`: bugs of Megatron-Core's local layer spec, which megatron_esft always builds (also where TE imports):
  sequence-parallel torch norms and MLA's rope-key gradient under TP. Always applied.
* `use_torch_adam()`: torch's AdamW inside Megatron-Core's optimizer also where TE or apex import. Called where the
  optimizer is built (training/setup.py), so tools without one do not import Megatron-Core's optimizer package.
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
    from . import local_spec, no_te

    no_te.apply(PATCHED)
    local_spec.apply(PATCHED)
    if not torch.cuda.is_available():
        from . import cpu

        cpu.apply(PATCHED)
    _APPLIED = True
    return PATCHED


def use_torch_adam() -> None:
    """megatron/core/optimizer/__init__.py:12-33 takes TE's or apex's FusedAdam when either imports (NGC images), and
    distrib_optimizer.py:21-36 then handles `step` the FusedAdam way (one per param group, not per parameter).
    megatron_esft's optimizer-state checkpoints (checkpoint/training_state.py), `--no-fused-adam` and every test use
    torch's AdamW, whose fused kernel (training/setup.py `use_fused_adam`) is the same one-kernel update: select it,
    and its `step` handling, on every machine. The flags are read when the optimizer is built and saved, so setting
    them after the import is enough."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    if not mcore_optimizer.USING_PYTORCH_OPTIMIZER or distrib_optimizer.HAVE_APEX_OR_TE:
        mcore_optimizer.USING_PYTORCH_OPTIMIZER = True
        distrib_optimizer.HAVE_APEX_OR_TE = False
        distrib_optimizer.USING_TE_OPTIMIZER = distrib_optimizer.USING_APEX_OPTIMIZER = False
        PATCHED.append("optimizer: torch AdamW and its per-parameter step instead of TE/apex FusedAdam")
