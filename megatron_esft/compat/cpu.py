"""Run Megatron-Core 0.16.1 on a CPU-only torch build with gloo. Applied only when CUDA is absent.

Measured facts behind each patch: ../shared/reference/mcore_cpu.md. Line numbers refer to megatron-core 0.16.1.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


class _DummyEvent:
    """Stands in for torch.cuda.Event: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _DummyStream:
    """Stands in for torch.cuda.Stream (MoE dispatchers and shared experts create side streams at construction)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _DummyStream)

    def __hash__(self):
        return 0


_STREAM = _DummyStream()


def _cpu_device(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites hard-coded CUDA placement to CPU.

    Works around: optimizer/optimizer.py:907 (`torch.tensor([1.0], device='cuda')` in FP32Optimizer),
    distributed/param_and_grad_buffer.py:768, moe/moe_utils.py:998 (track_moe_metrics), ChainedOptimizer.get_loss_scale
    (all `device='cuda'` or `torch.cuda.current_device()`), `Tensor.cuda()` calls, and the type checks
    `param.type() == 'torch.cuda.FloatTensor'` in optimizer/distrib_optimizer.py and optimizer/clip_grads.py:167.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if "cuda" in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def _set(patched: list[str], obj, name: str, value) -> None:
    setattr(obj, name, value)
    patched.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")


def apply(patched: list[str]) -> None:
    global _MODE
    # tensor_parallel/random.py:235 CudaRNGStatesTracker.add -> torch.cuda.get_rng_state(): "Torch not compiled with
    # CUDA enabled". The model-parallel RNG tracker forks the CPU generator instead. torch.cuda.manual_seed must not
    # call torch.manual_seed (that calls torch.cuda.manual_seed_all and recurses).
    _set(patched, torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(patched, torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _set(patched, torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(patched, torch.cuda, "manual_seed_all", lambda seed: None)
    import megatron.core.tensor_parallel.random as mrandom

    # random.py:41/72: same, for the tracker's private getters/setters (the CPU build silently defers
    # torch.cuda.set_rng_state, which would break fork() semantics, so both directions are redirected).
    _set(patched, mrandom, "_get_cuda_rng_state",
         lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    _set(patched, mrandom, "_set_cuda_rng_state",
         lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))

    # moe/router.py:90, moe/experts.py:184: `.to(device=torch.cuda.current_device())`.
    _set(patched, torch.cuda, "current_device", lambda: "cpu")
    # moe/token_dispatcher.py:445 and moe/shared_experts.py:123 create torch.cuda.Stream() at construction.
    _set(patched, torch.cuda, "Stream", _DummyStream)
    _set(patched, torch.cuda, "Event", _DummyEvent)
    _set(patched, torch.cuda, "current_stream", lambda device=None: _STREAM)
    _set(patched, torch.cuda, "default_stream", lambda device=None: _STREAM)
    _set(patched, torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _set(patched, torch.cuda, "synchronize", lambda device=None: None)
    _set(patched, torch.Tensor, "record_stream", lambda self, stream: None)

    # moe/token_dispatcher.py:876-879: split sizes go through maybe_move_tensor_to_cpu(..., as_numpy=True), which only
    # converts CUDA tensors, so on CPU all_to_all_single receives torch tensors and raises TypeError (EP>1, alltoall).
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _set(patched, token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)

    # Hard-coded CUDA placement in optimizer / DDP / clip_grads / MoE metrics (see CudaToCpuMode).
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    patched.append("CudaToCpuMode (global TorchFunctionMode)")
