"""A training iteration's forward and backward as one CUDA graph: Megatron-LM's `--cuda-graph-impl local
--cuda-graph-scope full_iteration`.

Why: ESFT of the 27-layer DeepSeek-V2-Lite shape on one H200 left the GPU idle ~39 % of a step, waiting for the host
to dispatch and launch ~7,000 aten ops one by one (docs/gpu.md, "Where the time goes"). Replaying a captured graph
launches every kernel of every micro-batch's forward and backward at once; the host then runs only the optimizer
step, the logging and the copy of the next batches.

What a capture needs, and how the trainer provides it:
* nothing in the iteration reads a device value on the host: `--moe-token-counts device` (the host token counts
  copy the counts to the host in every MoE layer), no FlexAttention block masks (built per batch on the host). The
  second eager iteration (the first builds torch.compile's kernels, which may synchronize) runs under torch's sync
  debug mode ("error": any synchronizing CUDA call, in forward or in autograd's backward thread, raises), which a
  one-line error then names (a capture would fail with "operation not permitted when stream is capturing", or
  worse, bake in the value it read). Not under a dispatch mode such as
  `graph_checks.HostSyncs`: one call of a torch.compile'd function under any TorchDispatchMode makes Dynamo skip its
  frame for good (torch 2.13, checked on CPU), so the fused SwiGLU and the chunked loss would stay uncompiled for the
  rest of the run. On a CPU, where the trainer compiles nothing, `HostSyncs` does the check instead;
* fixed shapes and addresses: the batches are copied into static device buffers that the graph reads (every
  micro-batch is [micro-batch size, seq length]); the loss scale, a Python float that changes per iteration, is a
  device scalar; Megatron's DDP and optimizer write gradients and updated weights in place. On a CPU the second and
  third iterations are recorded op by op (`graph_checks.OpTrace`: arguments, Python numbers, the addresses of
  tensors from before the iteration) and must match: what differs is what a replay would get wrong;
* one side stream for everything autograd keeps (`capture_stream`, `on_stream`): autograd runs a node's backward on
  the stream that was current when the node was made, and Megatron's DDP makes and keeps one gradient-accumulation
  node per trained parameter when it is built (its gradient hooks). Built on the default stream, a captured backward
  would hand every gradient to the default stream, which cannot join a capture (cudaErrorStreamCaptureImplicit;
  Megatron-LM's full-iteration graphs fixed the same in NVIDIA/Megatron-LM#6021, and torch's CUDA-graph notes ask
  for DDP to be built on a side stream). So the trainer builds DDP on `capture_stream`, and the graph runs every
  iteration (eager, captured, replayed) on that stream;
* Python runs once, at capture: hooks (the hang guard, the expert-load tracker's in-place counts, DDP's gradient
  hooks) are recorded as the kernels they launched, and caches (the permutation's index constants, the stacked expert
  weights, a frozen router's fp32 weight) must keep the tensors the graph reads alive: `_keep_alive` holds the
  permutation's (its cache may drop entries); the others change only if frozen weights are replaced, which the
  trainer never does during a run.

As Megatron-Core's `FullCudaGraphWrapper` (full_cuda_graph.py): `warmup_steps` eager iterations (lazy initialization,
cuBLAS workspaces, torch.compile's kernels, the caches above), then one capture, then replays. At least two: the
first builds everything, the second is the watched one. Unlike it, no RNG tracker state is registered
with the graph: the models have no dropout (models/provider.py), so nothing in the iteration draws random numbers.

On a machine without CUDA nothing is captured: every iteration runs eagerly through the same static buffers and
scale (tests compare that with the plain loop), the host-sync check runs on the second iteration as on a GPU, and
the third must repeat the second.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch

from megatron_esft.errors import UserError
from megatron_esft.training.graph_checks import HostSyncs, OpTrace, first_difference


def capture_stream(device) -> "torch.cuda.Stream | None":
    """The side stream the whole-iteration graph runs on (None without CUDA: nothing is captured). Build DDP (any
    module that keeps autograd nodes of trained parameters) inside `on_stream` of it (module docstring)."""
    device = torch.device(device)
    return torch.cuda.Stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def on_stream(stream):
    """Run the block on `stream` (no-op for None), ordered after the current stream's work and before its next."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


def _reads_on_host(what: str) -> UserError:
    return UserError(f"--cuda-graph-scope full_iteration: the training iteration reads device values on the host "
                     f"({what}), which a CUDA graph cannot capture; with MoE layers use --moe-token-counts device")


def _culprit_frame(exc: BaseException):
    """The innermost frame of `exc` outside torch's code and our compat layer's: for a sync in backward, the innermost
    frames are autograd's (the engine re-raises there; on a CPU the compat layer's function mode wraps the call), and
    the line that called backward says more."""
    from megatron_esft import compat

    frames = traceback.extract_tb(exc.__traceback__)
    plumbing = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, compat))
    return next((f for f in reversed(frames) if not f.filename.startswith(plumbing)), frames[-1])


def _first_change(static: list[dict], batches: list[dict]) -> str | None:
    """Where `batches` stop matching the static buffers' count, keys, shapes or dtypes, or None."""
    if len(batches) != len(static):
        return f"{len(static)} micro-batches -> {len(batches)}"
    for i, (have, new) in enumerate(zip(static, batches)):
        if have.keys() != new.keys():
            return f"micro-batch {i}: fields {sorted(have)} -> {sorted(new)}"
        for key, value in new.items():
            if value.shape != have[key].shape or value.dtype != have[key].dtype:
                return (f"micro-batch {i}, {key}: {list(have[key].shape)} {have[key].dtype} -> "
                        f"{list(value.shape)} {value.dtype}")
    return None


class FullIterationGraph:
    """`graph(batches, scale)` runs `iteration(static_batches, static_scale)` (forward and backward of all the
    iteration's micro-batches; its return value is kept and returned by every later call, updated in place by
    the replays) on static copies of `batches` (a list of dicts of tensors) and of `scale` (a float)."""

    def __init__(self, iteration, warmup_steps: int, device, stream=None):
        if warmup_steps < 2:  # one to build and initialize everything, one watched for host syncs
            raise ValueError("at least two eager iterations come before the capture")
        self.iteration, self.warmup_steps, self.device = iteration, warmup_steps, torch.device(device)
        # every iteration runs on it: the stream DDP was built on (capture_stream), else one of its own (None on a CPU)
        self.stream = stream if stream is not None else capture_stream(self.device)
        self.calls = 0
        self.graph = None
        self.static: list[dict] | None = None
        self.scale: torch.Tensor | None = None
        self.result = None
        self._keep_alive: list = []
        self._trace = None  # the CPU's record of the watched iteration, compared with the next one

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def pool_gib(self) -> float | None:
        """GiB the captured graph's private memory pool holds (the iteration's activations and temporaries, from the
        capture to the end of training; peak allocated memory stops counting them once the capture has freed
        them), or None before a capture."""
        if self.graph is None:
            return None
        pool = tuple(self.graph.pool())
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool) / 2**30

    def __call__(self, batches: list[dict], scale: float):
        self._stage(batches, scale)
        if self.graph is None and self.calls >= self.warmup_steps and self.device.type == "cuda":
            self._capture()
        with on_stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
            elif self.calls == 1:
                self.result = self._watched_iteration()
            elif self.calls == 2 and self._trace is not None:
                self.result = self._traced_again()
            else:
                self.result = self.iteration(self.static, self.scale)
        self.calls += 1
        return self.result

    def _stage(self, batches, scale) -> None:
        """Copy the batches into the static buffers (allocated on the first call); the shapes may never change."""
        if self.static is None:
            self.static = [{k: torch.empty_like(v, device=self.device) for k, v in b.items()} for b in batches]
            self.scale = torch.zeros((), dtype=torch.float32, device=self.device)
        if (change := _first_change(self.static, batches)) is not None:
            raise UserError(f"--cuda-graph-scope full_iteration: the iteration's micro-batches changed ({change}); "
                            "a CUDA graph replays fixed shapes")
        for static, batch in zip(self.static, batches):
            for key, value in batch.items():
                static[key].copy_(value, non_blocking=True)
        self.scale.fill_(scale)

    def _watched_iteration(self):
        """The second (eager) iteration: anything in it that reads a device value on the host stops the run."""
        if self.device.type == "cuda":
            return self._iteration_in_sync_debug_mode()
        with HostSyncs() as syncs, OpTrace() as self._trace:
            result = self.iteration(self.static, self.scale)
        if syncs.found:
            raise _reads_on_host(syncs.describe())
        return result

    def _traced_again(self):
        """The third (eager, CPU) iteration: the same aten ops with the same arguments as the second, as a replay of
        a graph captured from the second would run them (graph_checks.OpTrace)."""
        with OpTrace() as trace:
            result = self.iteration(self.static, self.scale)
        previous, self._trace = self._trace, None
        if (difference := first_difference(previous, trace)) is not None:
            raise UserError(f"--cuda-graph-scope full_iteration: the training iteration does not repeat itself "
                            f"({difference}); a CUDA graph would replay the captured iteration's values")
        return result

    def _iteration_in_sync_debug_mode(self):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self.iteration(self.static, self.scale)
        except RuntimeError as exc:
            if "synchroniz" not in str(exc):
                raise
            frame = _culprit_frame(exc)
            raise _reads_on_host(f"a synchronizing CUDA operation at {os.path.relpath(frame.filename)}:"
                                 f"{frame.lineno}") from exc
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def _capture(self) -> None:
        from megatron_esft.experts import permutation

        # torch.cuda.graph synchronizes and empties the allocator's cache first (the eager iterations' cached
        # activation blocks go back to the device, and the graph's own pool gets them); thread_local: the autograd
        # engine's device thread runs the captured backward
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.result = self.iteration(self.static, self.scale)
        except RuntimeError as exc:  # something the host-sync check cannot see (e.g. a stream synchronize)
            self.graph = None
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--cuda-graph-scope full_iteration: capturing the training iteration failed "
                            f"({first_line}); train without --cuda-graph-impl local") from exc
        self._keep_alive = permutation.index_constants()  # including any made during the capture


def graph_device_for(args):
    """The device a --cuda-graph-impl local graph is captured on, or None (no such flag)."""
    if args.cuda_graph_impl != "local":
        return None
    from megatron_esft import parallel as par

    return par.local_device()


def full_iteration_graph(args, model, iteration, device, stream) -> FullIterationGraph | None:
    """--cuda-graph-impl local --cuda-graph-scope full_iteration: every iteration's micro-batches, `iteration(batches,
    scale)` (the trainer's plain run of them), go through a FullIterationGraph captured on `device` after the warm-up
    iterations, on `stream`, the one DDP was built on. None without the flags (`device` None)."""
    if device is None:
        return None
    from megatron_esft import parallel as par
    from megatron_esft.experts.spec import experts_with_host_counts

    # the dispatcher's copy of the counts to the host waits on a CUDA event, which torch's sync debug mode does not
    # flag in the watched iteration: a capture would fail inside Megatron-Core, so say it here
    if host_counts := experts_with_host_counts(model):
        more = f" and {len(host_counts) - 1} more" if len(host_counts) > 1 else ""
        raise UserError(f"--cuda-graph-scope full_iteration: the routed experts of {host_counts[0]}{more} copy "
                        "their token counts to the host, which a CUDA graph cannot capture (--moe-token-counts "
                        "device needs bf16 experts, or FP8 with a weight cache, plain SwiGLU and grouped GEMM "
                        "kernels for the experts' shapes)")
    if device.type == "cuda":
        par.print_rank0(f"CUDA graph: the whole iteration, captured after {args.cuda_graph_warmup_steps} eager "
                        "iteration(s)")
    else:
        par.print_rank0("CUDA graph: no CUDA device, so nothing is captured; iterations run eagerly through the "
                        "graph's static buffers")
    return FullIterationGraph(iteration, args.cuda_graph_warmup_steps, device, stream)
