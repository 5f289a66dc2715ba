"""Where the experts' own Triton kernels (pair_sum.py, fp8_triton_gemm.py) can run: on CUDA tensors where Triton
imports, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1: the tests)."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_can_run(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take `t` (a CUDA tensor, or any under the interpreter)."""
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and triton_importable()
