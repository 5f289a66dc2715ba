"""Where the experts' own Triton kernels (pair_sum.py, fp8_triton_gemm.py, fp8_triton_quantize.py) can run: on CUDA
tensors where Triton imports, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1: the tests)."""

from __future__ import annotations

import functools
import importlib.util
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


def fresh_module(name: str, path: str, compiled: bool = False):
    """The module at `path` executed afresh as a new module object (sys.modules untouched): the kernels it defines
    are made under the current TRITON_INTERPRET (Triton reads it when a kernel is defined), or, if `compiled`, as
    compiled kernels whatever the environment says (ahead-of-time compilation)."""
    interpret = os.environ.pop("TRITON_INTERPRET", None) if compiled else None
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_fresh", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return module
