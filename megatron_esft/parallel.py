"""Process-group and model-parallel setup shared by every entry point.

A single `python tools/X.py` run gets a one-rank gloo (CPU) or nccl (GPU) group on a free local port; under
`torchrun` the usual RANK/WORLD_SIZE/MASTER_ADDR variables are used. Megatron-Core's parallel state is then
initialized with the requested TP/PP/EP sizes and the model-parallel RNG is seeded.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_esft import compat
from megatron_esft.errors import UserError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False  # forced on when TP > 1 with MoE (Megatron-Core requires it)
    # uneven pipeline stages (Megatron-LM's --decoder-first/last-pipeline-num-layers): the other stages split the
    # remaining layers evenly (models/provider.pipeline_stage_layers)
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    # how long a collective may wait for the other ranks (Megatron-LM's --distributed-timeout-minutes): None = the
    # ESFT_DIST_TIMEOUT_MIN environment variable, else 30
    distributed_timeout_minutes: int | None = None

    @classmethod
    def from_args(cls, args, **overrides) -> "ParallelConfig":
        """From parsed Megatron-LM-style arguments (`--tensor-model-parallel-size`, ..., and the uneven-pipeline
        flags of `add_uneven_pipeline_arguments` where the parser has them)."""
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        fields.pop("sequence_parallel", None)
        return cls(**{**fields, **overrides})

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size


def add_uneven_pipeline_arguments(parser) -> None:
    """Megatron-LM's uneven pipeline split (to an argparse parser or argument group)."""
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                        help="decoder layers of the first pipeline stage (the other stages split the rest evenly)")
    parser.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                        help="decoder layers of the last pipeline stage (the other stages split the rest evenly)")


def add_distributed_timeout_argument(parser) -> None:
    """Megatron-LM's --distributed-timeout-minutes (to an argparse parser or argument group)."""
    parser.add_argument("--distributed-timeout-minutes", type=int, default=None, metavar="MINUTES",
                        help="how long a collective waits for the other ranks before the run fails (default: "
                             "$ESFT_DIST_TIMEOUT_MIN, else 30; Megatron-LM's default is 10, too short for loading "
                             "a DeepSeek-V3 checkpoint on a slow file system)")


def timeout_minutes(requested: int | None) -> int:
    """--distributed-timeout-minutes, else $ESFT_DIST_TIMEOUT_MIN, else 30 (a bad value: a one-line UserError)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--distributed-timeout-minutes {requested}: must be at least 1")
        return requested
    value = os.environ.get("ESFT_DIST_TIMEOUT_MIN", "30")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"ESFT_DIST_TIMEOUT_MIN={value!r}: must be a whole number of minutes, at least 1")
    return int(value)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(minutes: int | None = None) -> None:
    """Create the default process group once (one local rank when not launched by torchrun)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=timeout_minutes(minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "gloo":
        # a gloo group left to the interpreter's teardown sometimes aborts the process after a successful run
        # ("terminate called without an active exception", exit status -6: 2 of 40 runs of a one-rank CPU model build
        # in a loop; 0 of 80 with this). nccl groups are destroyed explicitly (the trainer does at its end), not at
        # exit, where another rank may still be inside a collective.
        atexit.register(destroy)
    if "MASTER_ADDR" not in os.environ and world_size() == 1:
        # One local rank (not launched by torchrun): an in-process store, so concurrent single-process runs never
        # race for a TCP port. The environment is left untouched for subprocesses.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Apply compat patches, create process groups and Megatron-Core parallel state, seed RNGs."""
    compat.apply()
    minutes = timeout_minutes(parallel.distributed_timeout_minutes)
    init_process_group(minutes)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    n = dist.get_world_size()
    model_parallel = parallel.tp * parallel.pp
    if n % model_parallel:
        raise UserError(
            f"world size {n} is not divisible by tensor ({parallel.tp}) x pipeline ({parallel.pp}) parallel size"
        )
    data_parallel = n // model_parallel
    if (data_parallel * parallel.tp) % parallel.ep:
        raise UserError(
            f"--expert-model-parallel-size {parallel.ep} must divide data-parallel x tensor-parallel size "
            f"({data_parallel} x {parallel.tp}) on {n} ranks"
        )
    if parallel_state.model_parallel_is_initialized():
        _destroy_subgroups()
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        # experts are never tensor-parallel (ESFT trains whole experts; models.provider sets the same in the config)
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=minutes,  # the groups Megatron-Core makes (its default: 30 whatever was asked)
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def all_reduce(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor wherever it lives: nccl reduces only CUDA tensors, so CPU bookkeeping tensors
    (token counts, parameter counts, losses) take a round trip through the GPU there."""
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend(group) == "nccl" and not tensor.is_cuda:
        staged = tensor.cuda()
        dist.all_reduce(staged, op=op, group=group)
        tensor.copy_(staged.cpu())
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _destroy_subgroups() -> None:
    """Destroy every process group but the default one. Megatron-Core's `destroy_model_parallel` only forgets its
    groups, and each gloo group keeps a transport thread alive for the life of the process: a process that initializes
    again (the test suite does, hundreds of times: 17 groups and 51 threads a time) gathered thousands of threads
    whose wakeups took most of the CPU. A model built before re-initializing cannot communicate afterwards."""
    registry = getattr(dist.distributed_c10d, "_world", None)
    for group in list(getattr(registry, "pg_map", {})):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This rank's device: its current CUDA device (set by `init_process_group` from LOCAL_RANK), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
