"""A Triton row-wise-scaled FP8 grouped GEMM: the same computation and operand contract as
`torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)` in the 2-D x 3-D form the
FP8 experts use (experts/fp8.py), as a second kernel to measure against torch's.

Why: the FP8 experts target (1.4x the bf16 experts) is out of reach with torch's kernel. On the H100 its grouped FP8
GEMMs were only ~1.4x the bf16 grouped GEMMs on ESFT's shapes (~400-800 rows per expert), and by Amdahl's law over
the layer's GEMMs that caps the layer below 1.35x (docs/gpu.md). Hopper's FP8 peak is 2x bf16's, so the layer's
ceiling is set by how well the kernel handles these small groups. This kernel is tiled for them and autotuned on the
layer's (N, K, rows per group). It is selected with `fp8.set_fp8_gemm_kernel("triton")` (the trainer's
`--expert-fp8-gemm-kernel triton`, bench/gpu_esft.py's `"fp8_kernel"`). The bench's `gemm` job times it next to
torch's FP8 and bf16 kernels.

The kernel: one program per (row tile of one group, column tile). Row tiles never start in one group and end in the
next: a tile's rows past its group's end are not stored. A program finds its group from `offs` on the device (one
vector load of all the offsets and a prefix sum of the groups' tile counts), so no host sync is needed and the
launch can be captured in a CUDA graph. The grid is sized for the worst case (cdiv(M, BM) + G row tiles), and
programs past the last group's tiles exit at once. Each program accumulates e4m3 x e4m3 products in fp32 over K
(`tl.dot`: Hopper's FP8 wgmma, with Triton's Hopper default of fast accumulation, like torch's
`use_fast_accum=True`; Blackwell's tcgen05). It then applies the row-wise decode scales,
`acc * scale_a[row] * scale_b[group, column]` as torch's kernel does, and rounds once to bf16. Rows after
`offs[-1]` are not written. The autotuning candidates load their tiles by pointer (cp.async) or through host-made
TMA descriptors of the rows [M, K] and of the weights [G, N, K] (boxes past a tensor's end read zeros); three TMA
ones run a persistent grid (one program per SM striding over the tiles: experts/fp8_triton_gemm_kernels.py).

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, tests only; its fp32 -> bf16 conversion
truncates where a GPU rounds to nearest even). Elsewhere, or if the kernel fails to build (warned once), the caller
keeps torch's kernel. If only the TMA candidates fail, the pointer candidates go on (warned once).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from megatron_esft.experts.triton_support import triton_can_run

_failed = False
_tma = True  # False once a TMA candidate failed: the pointer candidates alone from then on
_pinned = None  # the candidate every launch uses instead of the autotuned one (`pin_config`)
launches = 0  # kernel launches so far (benchmarks report whether the kernel really ran)


def _configs(triton, loads=(False, True)):
    """Autotuning candidates on a GPU: the usual Hopper FP8 tiles, and smaller row tiles for groups of a few hundred
    rows (a 128-row tile wastes up to half its work on a group's last, partial tile), each with the tiles loaded by
    pointer (cp.async) and by the Tensor Memory Accelerator (TMA: one bulk copy per tile, no address arithmetic or
    masks in the main loop); `loads`: which of the two (TMA False / True) to include."""
    shapes = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3),
              (128, 128, 64, 4, 4), (64, 64, 128, 4, 4)]
    candidates = [(shape, tma, False) for tma in loads for shape in shapes]
    if True in loads:  # persistent grids: the three largest TMA tiles (the pointer ones spill or gain nothing)
        candidates += [(shape, True, True) for shape in shapes[:3]]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "TMA": tma, "PERSISTENT": persistent}, num_warps=warps,
                          num_stages=stages, pre_hook=_set_descriptor_blocks)
            for (bm, bn, bk, warps, stages), tma, persistent in candidates]


# the interpreter's fixed tiles (small: the tests' shapes span several of each); tests/experts run it with TMA too
INTERPRETER_CONFIG = {"BM": 16, "BN": 32, "BK": 32, "TMA": False, "PERSISTENT": False}
INTERPRETER_PROGRAMS = 3  # a persistent grid's size under the interpreter (on a GPU: one program per SM)


def _set_descriptor_blocks(nargs) -> None:
    """The TMA descriptors' boxes are one tile of the config about to run (an autotuning pre-hook)."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [1, nargs["BN"], nargs["BK"]]


@functools.lru_cache(maxsize=2)
def _kernel(tma: bool = True):
    """The kernel of experts/fp8_triton_gemm_kernels.py, on a GPU autotuned over `_configs` (without the TMA
    candidates if not `tma`), and whether it is the interpreter's. Made on first use: Triton reads TRITON_INTERPRET
    when a kernel is defined."""
    import triton

    from megatron_esft.experts import fp8_triton_gemm_kernels

    kernel = fp8_triton_gemm_kernels.load().scaled_grouped_mm_kernel
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel, True
    tuned = triton.autotune(configs=_configs(triton, (False, True) if tma else (False,)),
                            key=["N", "K", "ROWS_HINT"])(kernel)
    return tuned, False


def _descriptors(a_q, b_q_t):
    """Host-side TMA descriptors of a_q [M, K] and of the weights as [G, N, K] (K contiguous); their boxes are set
    per config (`_set_descriptor_blocks`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), (g, _, n) = a_q.shape, b_q_t.shape
    a_desc = TensorDescriptor(a_q, [m, k], [a_q.stride(0), 1], [16, 16])
    b_desc = TensorDescriptor(b_q_t, [g, n, k], [b_q_t.stride(0), b_q_t.stride(2), 1], [1, 16, 16])
    return a_desc, b_desc


def usable(a_q: torch.Tensor) -> bool:
    """Whether `scaled_grouped_mm` can run on a_q's device (else the caller keeps torch's kernel)."""
    return not _failed and triton_can_run(a_q)


def scaled_grouped_mm(a_q: torch.Tensor, b_q_t: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      offs: torch.Tensor, config=None) -> torch.Tensor | None:
    """[M, N] bf16 with rows offs[g-1]:offs[g] = (a_q rows @ b_q_t[g]) * scale_a[rows, None] * scale_b[g]: a_q [M, K]
    e4m3 row-major, b_q_t [G, K, N] e4m3 with K contiguous, scale_a [M] and scale_b [G, N] float32 decode scales,
    offs int32 [G] group ends (experts/fp8.py checks the operands first). None if the kernel failed to build (warned
    once). `config`: one of `_configs`' candidates instead of the autotuned (or pinned) one (tests, benchmarks)."""
    global _failed, _tma, launches
    config = _pinned if config is None else config
    m, k = a_q.shape
    g, _, n = b_q_t.shape
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a_q.device)
    if m == 0 or n == 0 or g == 0:
        return out
    try:
        try:
            _launch(a_q, b_q_t, scale_a, scale_b, offs, out, config)
        except Exception as exc:  # noqa: BLE001 (TMA needs the most from the driver and Triton: keep the rest)
            if not _tma or config is not None:  # an explicit candidate is not replaced by another
                raise
            _tma = False
            warnings.warn(f"the Triton FP8 grouped GEMM's TMA candidates failed ({_describe(exc)}); its pointer "
                          "candidates alone from now on", RuntimeWarning, stacklevel=2)
            _launch(a_q, b_q_t, scale_a, scale_b, offs, out, None)
    except Exception as exc:  # noqa: BLE001 (a Triton build or launch failure: fall back, once, loudly)
        _failed = True
        warnings.warn(f"the Triton FP8 grouped GEMM failed ({_describe(exc)}); the FP8 experts use "
                      "torch._scaled_grouped_mm", RuntimeWarning, stacklevel=2)
        return None
    launches += 1
    return out


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _launch(a_q, b_q_t, scale_a, scale_b, offs, out, config) -> None:
    (m, k), (g, _, n) = a_q.shape, b_q_t.shape
    kernel, interpreted = _kernel(_tma)
    # the autotuning key's row count per group, rounded to a power of two (shapes only: no host sync)
    rows_hint = 1 << max(0, (m // g).bit_length() - 1)
    a_desc, b_desc = _descriptors(a_q, b_q_t)
    args = (a_q, b_q_t, a_desc, b_desc, out, scale_a, scale_b, offs, n, a_q.stride(0), b_q_t.stride(0),
            b_q_t.stride(2), scale_b.stride(0), out.stride(0), rows_hint)
    sizes = {"K": k, "G": g, "GP": 1 << (g - 1).bit_length()}

    def grid(meta):
        tiles = (-(-m // meta["BM"]) + g) * -(-n // meta["BN"])  # the worst case over the groups' sizes
        if meta["PERSISTENT"]:
            return (min(tiles, INTERPRETER_PROGRAMS if interpreted else _sm_count(a_q.device)),)
        return (tiles,)

    if interpreted or config is not None:
        tiles = dict(INTERPRETER_CONFIG, TMA=INTERPRETER_CONFIG["TMA"] and _tma) if config is None else \
            dict(config.kwargs)
        _set_descriptor_blocks({"a_desc": a_desc, "b_desc": b_desc, **tiles})
        launch = kernel if interpreted else kernel.fn  # the autotuner's own kernel, for a chosen config
        options = {} if config is None else {"num_warps": config.num_warps, "num_stages": config.num_stages}
        launch[grid(tiles)](*args, **sizes, **tiles, **options, INTERPRETED=interpreted)
    else:
        kernel[grid](*args, **sizes)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_label(config) -> str:
    """'TMA 64x128x128 w4 s4' (or 'persistent TMA ...'): how a table names an autotuning candidate."""
    kw = config.kwargs
    return (f"{'persistent ' if kw.get('PERSISTENT') else ''}{'TMA' if kw['TMA'] else 'pointer'} "
            f"{kw['BM']}x{kw['BN']}x{kw['BK']} w{config.num_warps} s{config.num_stages}")


def candidates() -> dict:
    """{`config_label`: candidate} of every autotuning candidate, in `_configs`' order."""
    import triton

    return {config_label(c): c for c in _configs(triton)}


def pin_config(label: str | None) -> None:
    """Launch the candidate named `label` (`config_label`) every time instead of autotuning; None autotunes again.
    The candidates' tiles round differently (their fp32 sums over K run in other orders), and the autotuner may
    choose another candidate in each process: pinning one makes runs, and a resumed run, bit-identical."""
    global _pinned
    if label is None:
        _pinned = None
        return
    by_label = candidates()
    if label not in by_label:
        raise ValueError(f"Triton FP8 GEMM candidate {label!r}: choose from {', '.join(map(repr, by_label))}")
    _pinned = by_label[label]


def _autotuner():
    """The autotuned kernel if one was made (None before the first launch, or under the interpreter)."""
    if not _kernel.cache_info().currsize:
        return None
    kernel, interpreted = _kernel(_tma)
    return None if interpreted else kernel


def autotuned_choices() -> dict[tuple, str]:
    """{(N, K, rows per group rounded to a power of two): the candidate's label} of every shape autotuned so far."""
    return {tuple(key[:3]): config_label(c) for key, c in getattr(_autotuner(), "cache", {}).items()}


def autotuned_config():
    """The candidate the autotuner chose for the last launch (None before any, or under the interpreter)."""
    return getattr(_autotuner(), "best_config", None)


def compile_ahead_of_time(config, k: int, groups: int = 64, capability: int = 90):
    """The kernel with one autotuning `config` compiled for compute capability 9.0 or 10.0 at contraction `k`,
    specialised as the JIT specialises it at run time (experts/fp8.py's contract: 16-byte aligned operands, sizes and
    strides multiples of 16): a triton_aot.CompiledKernel. No GPU needed."""
    from megatron_esft.experts import fp8_triton_gemm_kernels
    from megatron_esft.experts.triton_aot import compile_for

    fn = fp8_triton_gemm_kernels.load(compiled=True).scaled_grouped_mm_kernel
    kw = config.kwargs
    types = {"a": "*fp8e4nv", "b": "*fp8e4nv", "out": "*bf16", "scale_a": "*fp32", "scale_b": "*fp32", "offs": "*i32",
             "a_desc": f"tensordesc<fp8e4nv[{kw['BM']}, {kw['BK']}]>",
             "b_desc": f"tensordesc<fp8e4nv[1, {kw['BN']}, {kw['BK']}]>"}
    constexprs = dict(K=k, G=groups, GP=1 << (groups - 1).bit_length(), INTERPRETED=False, **kw)
    runtime = [name for name in fn.arg_names if name not in constexprs]
    return compile_for(fn, {name: types.get(name, "i32") for name in runtime}, constexprs,
                       divisible_by_16=[name for name in runtime if not name.endswith("_desc")],
                       num_warps=config.num_warps, num_stages=config.num_stages, capability=capability)
