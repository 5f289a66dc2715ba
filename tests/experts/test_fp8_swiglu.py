"""The fused FP8 expert MLP (experts/fp8_swiglu.py) against a float64 SwiGLU MLP and against the unfused FP8 chain
(fp8_grouped_mm -> SwiGLU -> fp8_grouped_mm); the fused kernels compiled by torch.compile against their eager
references; frozen weights get no gradient and their MLP saves neither its input nor the activation."""

import pytest
import torch
import torch.nn.functional as F

from megatron_esft.experts.fp8 import FP8WeightCache, fp8_grouped_mm, scaled_grouped_mm_supported
from megatron_esft.experts.fp8_swiglu import (
    fp8_swiglu_mlp, swiglu_backward_quantize_keep_reference, swiglu_backward_quantize_reference,
    swiglu_quantize_reference, weighted_swiglu_reference,
)

COUNTS, H, FFN = [5, 0, 40, 23], 64, 48  # H != FFN and H != 2 FFN: saved tensors are told apart by shape
FP8_MLP_TOL = 0.08  # documented whole-MLP tolerance (docs/gpu.md): two chained e4m3 GEMMs


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = sum(COUNTS)
    x = torch.randn(m, H, generator=g).bfloat16()
    probs = torch.rand(m, generator=g)
    fc1 = (torch.randn(len(COUNTS), 2 * FFN, H, generator=g) * 0.1).bfloat16()
    fc2 = (torch.randn(len(COUNTS), H, FFN, generator=g) * 0.1).bfloat16()
    dy = torch.randn(m, H, generator=g).bfloat16()
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    return x, probs, fc1, fc2, dy, offs


def _run(fused: bool, train: bool, seed=0):
    x, probs, fc1, fc2, dy, offs = _inputs(seed)
    x.requires_grad_(True)
    probs.requires_grad_(True)
    fc1.requires_grad_(train)
    fc2.requires_grad_(train)
    if fused:
        y = fp8_swiglu_mlp(x, probs, fc1, fc2, offs, FP8WeightCache("none"))
    else:
        h = fp8_grouped_mm(x, fc1, offs, FP8WeightCache("none"))
        gate, up = h.chunk(2, dim=-1)
        y = fp8_grouped_mm((F.silu(gate) * up * probs[:, None]).bfloat16(), fc2, offs, FP8WeightCache("none"))
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dprobs": probs.grad, "dfc1": fc1.grad, "dfc2": fc2.grad}


def _float64(seed=0):
    x, probs, fc1, fc2, dy, _ = (t.double() if t.is_floating_point() else t for t in _inputs(seed))
    for t in (x, probs, fc1, fc2):
        t.requires_grad_(True)
    outs, start = [], 0
    for e, n in enumerate(COUNTS):
        gate, up = (x[start:start + n] @ fc1[e].T).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up * probs[start:start + n, None]) @ fc2[e].T)
        start += n
    y = torch.cat(outs)
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dprobs": probs.grad, "dfc1": fc1.grad, "dfc2": fc2.grad}


@pytest.mark.parametrize("train", [True, False])
def test_fused_against_float64_and_unfused_chain(train):
    fused, unfused, ref = _run(True, train), _run(False, train), _float64()
    for name in ("y", "dx", "dprobs"):
        assert torch.isfinite(fused[name]).all()
        assert _rel(fused[name], ref[name]) < FP8_MLP_TOL, name
        # as accurate as the unfused chain (CPU run: 6.1e-2 both for y)
        assert _rel(fused[name], ref[name]) <= 1.05 * _rel(unfused[name], ref[name]), name
        # the only difference: the activation is quantized from fp32, not after a bf16 rounding, so its row
        # scales differ in the last bits and some elements round to the neighbouring e4m3 value (CPU: <= 1e-2)
        assert _rel(fused[name], unfused[name]) < 2e-2, name
    for name in ("dfc1", "dfc2"):
        if train:  # bf16 wgrad from the fp8-dgrad chain: the FP8 error of dh / the activation, no more
            assert _rel(fused[name], ref[name]) < FP8_MLP_TOL, name
            assert _rel(fused[name], unfused[name]) < 2e-2, name
            assert torch.all(fused[name][COUNTS.index(0)] == 0)  # an expert without tokens: exact zero gradient
        else:
            assert fused[name] is None


def test_frozen_mlp_saves_neither_input_nor_activation():
    x, probs, fc1, fc2, dy, offs = _inputs()
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = fp8_swiglu_mlp(x, probs, fc1, fc2, offs, FP8WeightCache("frozen"))
    m = sum(COUNTS)
    assert (m, H) not in saved and (m, FFN) not in saved  # only h [m, 2 FFN], probs and the weights
    assert (m, 2 * FFN) in saved
    y.backward(dy)
    assert x.grad is not None and fc1.grad is None and fc2.grad is None


def test_compiled_kernels_equal_their_eager_references():
    """Each fused kernel through `CompiledOnCuda.compiled`, the path CUDA tensors take (torch.compile with the row
    dimension marked dynamic; Inductor's C++ backend here, Triton on a GPU), at two row counts: the eager results,
    no fallback to eager (a failed compile falls back), and no recompilation for the second row count (a guard on
    the row count would recompile for every group size of every step)."""
    from megatron_esft.experts.fp8 import CompiledOnCuda, quantize_lastdim_reference
    from megatron_esft.models.linear_cross_entropy import _loss_and_logit_grad_reference

    g = torch.Generator().manual_seed(5)

    def cases(m):
        h = torch.randn(m, 2 * FFN, generator=g).bfloat16()
        da = torch.randn(m, FFN, generator=g).bfloat16()
        probs = torch.rand(m, 1, generator=g)
        labels = torch.randint(-1, 2 * FFN + 2, (m,), generator=g)  # some outside the vocabulary
        return [(swiglu_quantize_reference, (h, probs)), (weighted_swiglu_reference, (h, probs)),
                (swiglu_backward_quantize_reference, (da, h, probs)),
                (swiglu_backward_quantize_keep_reference, (da, h, probs)), (quantize_lastdim_reference, (h,)),
                (_loss_and_logit_grad_reference, (h, labels))]

    kernels = {}
    for m in (37, 54):
        for fn, args in cases(m):
            kernel = kernels.setdefault(fn, CompiledOnCuda(fn))
            with torch._dynamo.config.patch(error_on_recompile=m != 37):  # the second row count: no new graph
                eager, compiled = fn(*args), kernel.compiled(*args)
            assert not kernel._failed, fn.__name__
            eager = (eager,) if torch.is_tensor(eager) else eager
            compiled = (compiled,) if torch.is_tensor(compiled) else compiled
            for e, c in zip(eager, compiled, strict=True):
                assert e.dtype == c.dtype and e.shape == c.shape, fn.__name__
                if e.dtype == torch.float8_e4m3fn:  # fp32 math in another order: an e4m3 rounding tie may flip
                    assert (e.float() != c.float()).float().mean() < 1e-3, fn.__name__
                else:
                    torch.testing.assert_close(c.float(), e.float(), rtol=1e-5, atol=1e-6, msg=fn.__name__)


def test_rejects_bad_inputs():
    x, probs, fc1, fc2, _, offs = _inputs()
    with pytest.raises(ValueError, match="bf16"):
        fp8_swiglu_mlp(x.float(), probs, fc1, fc2, offs, FP8WeightCache())
    with pytest.raises(ValueError, match="at least one row"):
        fp8_swiglu_mlp(x[:0], probs[:0], fc1, fc2, offs * 0, FP8WeightCache())


@pytest.mark.skipif(not (torch.cuda.is_available() and scaled_grouped_mm_supported(torch.device("cuda"))),
                    reason="torch._scaled_grouped_mm needs a CUDA sm90/sm100 GPU (CPU CI uses the emulation)")
def test_cuda_fused_mlp_matches_cpu_emulation_and_compiles():
    """On the GPU: the real scaled grouped GEMMs and the Triton-compiled fused kernels against the CPU emulation of
    the same math, and the float64 MLP."""
    from megatron_esft.experts import fp8_swiglu

    cpu = _run(True, train=True)
    ref = _float64()
    x, probs, fc1, fc2, dy, offs = (t.cuda() for t in _inputs())
    x.requires_grad_(True)
    probs.requires_grad_(True)
    fc1.requires_grad_(True)
    fc2.requires_grad_(True)
    y = fp8_swiglu_mlp(x, probs, fc1, fc2, offs, FP8WeightCache("none"))
    y.backward(dy)
    gpu = {"y": y, "dx": x.grad, "dprobs": probs.grad, "dfc1": fc1.grad, "dfc2": fc2.grad}
    for name in gpu:
        assert _rel(gpu[name].cpu(), ref[name]) < FP8_MLP_TOL, name
        assert _rel(gpu[name].cpu(), cpu[name]) < 2e-2, name  # fp32 accumulation order, e4m3 rounding ties
    for kernel in (fp8_swiglu.swiglu_quantize, fp8_swiglu.swiglu_backward_quantize_keep, fp8_swiglu.weighted_swiglu):
        assert kernel._compiled is not None and not kernel._failed, kernel.reference.__name__
