"""FP8 expert GEMMs (experts/fp8.py): quantization math against float64, the autograd split (FP8 fwd/dgrad, bf16
wgrad for trainable weights only), the weight cache, and the model path. On CPU the scaled grouped GEMM is the
float32 emulation from the same e4m3 values; the real `torch._scaled_grouped_mm` kernel is compared with that
emulation only on an sm90/sm100 GPU (skipped elsewhere: CI has no GPU)."""

import pytest
import torch
from tiny import batch, build_model, expert_grads, freeze_grouped, loss_of, tiny_config

from megatron_esft.experts import set_expert_gemm_backend
from megatron_esft.experts.fp8 import (
    FP8_MAX, FP8WeightCache, fp8_grouped_mm, quantize_lastdim_reference, scaled_grouped_mm_supported,
)

E4M3_REL = 2.0 ** -4  # half an ulp of a 3-bit mantissa: worst-case relative rounding error of a normal e4m3 value


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _groups(counts, k, n, g=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = sum(counts)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(len(counts), n, k, generator=gen) * 0.05).bfloat16()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, offs


def _reference(x, w, counts):
    """float64 y[s:e] = x[s:e] @ w[g].T"""
    outs, start = [], 0
    for g, c in enumerate(counts):
        outs.append(x[start:start + c].double() @ w[g].double().T)
        start += c
    return torch.cat(outs)


def test_rowwise_quantization_against_float64():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(37, 64, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, 37, dtype=torch.float64)[:, None]
    t[5] = 0.0  # an all-zero row: scale 1, exact zeros
    q, scale = quantize_lastdim_reference(t.bfloat16())
    assert q.dtype == torch.float8_e4m3fn and q.shape == t.shape and scale.shape == (37,)
    src = t.bfloat16().double()
    deq = q.double() * scale.double()[:, None]
    amax = src.abs().amax(-1)
    # the largest element of each row maps to +-448 (up to the fp32 rounding of the scale)
    peak = q.double().abs().amax(-1)
    assert torch.all(peak[amax > 0] == FP8_MAX)
    assert scale[5] == 1 and torch.all(q[5].double() == 0)
    # elements in e4m3's normal range round within half an ulp; subnormals within half the smallest step
    tol = E4M3_REL * src.abs() + (scale.double()[:, None] * 2.0 ** -10)
    assert torch.all((deq - src).abs() <= tol * (1 + 1e-6))


def test_quantization_of_a_transposed_view_is_rowwise_over_the_last_dim():
    w = torch.randn(3, 48, 32).bfloat16()
    q, s = quantize_lastdim_reference(w.transpose(-2, -1))  # [3, 32, 48] rows over N
    assert q.is_contiguous() and q.shape == (3, 32, 48) and s.shape == (3, 32)
    q2, s2 = quantize_lastdim_reference(w.transpose(-2, -1).contiguous())
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.parametrize("counts", [[5, 0, 13, 6], [0, 0, 7], [16]])
def test_forward_and_backward_against_float64(counts):
    k, n = 32, 48
    x, w, offs = _groups(counts, k, n, seed=len(counts))
    x.requires_grad_(True)
    w.requires_grad_(True)
    dy = torch.randn(sum(counts), n).bfloat16()
    y = fp8_grouped_mm(x, w, offs, FP8WeightCache("none"))
    y.backward(dy)
    ref = _reference(x.detach(), w.detach(), counts)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, ref) < 0.06  # two e4m3 operands: a few % relative error
    # dgrad: dy @ w[g], both e4m3
    ref_dx, start = [], 0
    for g, c in enumerate(counts):
        ref_dx.append(dy[start:start + c].double() @ w[g].double().detach())
        start += c
    assert _rel(x.grad, torch.cat(ref_dx)) < 0.06
    # wgrad stays bf16 (bf16 output rounding only), and an expert without tokens gets exact zeros
    start = 0
    for g, c in enumerate(counts):
        ref_dw = dy[start:start + c].double().T @ x.detach()[start:start + c].double()
        if c == 0:
            assert torch.all(w.grad[g] == 0)
        else:
            assert _rel(w.grad[g], ref_dw) < 1e-2
        start += c


def test_emulated_gemm_is_exact_given_the_quantized_operands():
    counts, k, n = [3, 9, 4], 32, 16
    x, w, offs = _groups(counts, k, n, seed=3)
    y = fp8_grouped_mm(x, w, offs, FP8WeightCache("none"))
    xq, xs = quantize_lastdim_reference(x)
    wq, ws = quantize_lastdim_reference(w)
    deq_x = xq.double() * xs.double()[:, None]
    deq_w = wq.double() * ws.double()[..., None]
    ref = _reference(deq_x, deq_w, counts)
    assert _rel(y, ref) < 2.0 ** -8  # only the bf16 output rounding differs


def test_emulated_gemm_refuses_what_the_cuda_kernel_refuses():
    """The CPU emulation checks the operands as torch's CUDA kernel does (the layouts validated on an H200), so a
    layout change fails here rather than on a GPU."""
    from megatron_esft.experts.fp8 import _scaled_mm

    x, w, offs = _groups([3, 9, 4], 32, 16, seed=3)
    xq, xs = quantize_lastdim_reference(x)
    wq, ws = quantize_lastdim_reference(w)  # [G, N, K], scales [G, N]
    _scaled_mm(xq, wq.transpose(-2, -1), xs, ws, offs)  # the layout the kernels get
    for args, problem in [((xq, wq.transpose(-2, -1).contiguous(), xs, ws, offs), "column-major"),
                          ((xq, wq.transpose(-2, -1), xs[:-1], ws, offs), "scale_a"),
                          ((xq, wq.transpose(-2, -1), xs, ws.t().contiguous().t(), offs), "scale_b"),
                          ((xq, wq.transpose(-2, -1), xs, ws, offs.long()), "offs int32"),
                          ((xq.t().contiguous().t(), wq.transpose(-2, -1), xs, ws, offs), "row-major")]:
        with pytest.raises(ValueError, match=problem):
            _scaled_mm(*args)


def test_frozen_weight_gets_no_wgrad_and_its_input_is_not_saved():
    counts, k, n = [4, 4], 32, 16
    x, w, offs = _groups(counts, k, n)
    x.requires_grad_(True)  # w stays frozen
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fp8_grouped_mm(x, w, offs, FP8WeightCache("frozen"))
    assert tuple(x.shape) not in saved
    y.backward(torch.randn_like(y))
    assert w.grad is None and x.grad is not None


def test_weight_cache_policies():
    counts, k, n = [4, 4], 32, 16
    x, w, offs = _groups(counts, k, n)
    x.requires_grad_(True)
    cache = FP8WeightCache("frozen")
    for _ in range(3):
        fp8_grouped_mm(x, w, offs, cache).backward(torch.ones(8, n).bfloat16())
    assert cache.quantizations == 2  # one per layout, reused afterwards
    with torch.no_grad():
        w.mul_(2)  # an in-place change bumps the version: re-quantize
    y = fp8_grouped_mm(x, w, offs, cache)
    assert cache.quantizations == 3
    assert _rel(y, _reference(x.detach(), w, counts)) < 0.06
    trainable = w.clone().requires_grad_(True)
    cache = FP8WeightCache("frozen")
    for _ in range(2):
        fp8_grouped_mm(x, trainable, offs, cache).backward(torch.ones(8, n).bfloat16())
    assert cache.quantizations == 4 and cache.nbytes() == 0  # trainable weights are not cached under "frozen"
    with pytest.raises(ValueError, match="policy"):
        FP8WeightCache("sometimes")


def test_model_with_fp8_experts_tracks_bf16_experts(mcore):
    config = tiny_config(params_dtype=torch.bfloat16, bf16=True, moe_ffn_hidden_size=16, hidden_size=32)
    torch.manual_seed(0)
    bf16_model = build_model(config, grouped=True)
    fp8_model = build_model(config, grouped=True)
    fp8_model.load_state_dict(bf16_model.state_dict())
    trainable = {2: [1, 6]}
    freeze_grouped(bf16_model, trainable)
    freeze_grouped(fp8_model, trainable)
    experts = fp8_model.decoder.layers[1].mlp.experts
    assert set_expert_gemm_backend([fp8_model], "fp8") == 1 and experts.gemm_backend == "fp8"
    data = batch(seed=4)
    loss_bf16, loss_fp8 = loss_of(bf16_model, data), loss_of(fp8_model, data)
    loss_bf16.backward()
    loss_fp8.backward()
    assert abs(loss_bf16.item() - loss_fp8.item()) < 2e-2 * abs(loss_bf16.item())
    g_bf16, g_fp8 = expert_grads(bf16_model), expert_grads(fp8_model)
    for key, g in g_bf16.items():
        if key[1] in trainable[key[0]]:
            assert _rel(g_fp8[key], g) < 0.15, key
        else:
            assert g is None and g_fp8[key] is None
    assert experts._fp8_cache.quantizations > 0
    with pytest.raises(ValueError, match="backend"):
        experts.set_gemm_backend("int4")


def test_fp8_rejects_unaligned_or_non_bf16_inputs():
    x, w, offs = _groups([4], 32, 16)
    with pytest.raises(ValueError, match="bf16"):
        fp8_grouped_mm(x.float(), w, offs, FP8WeightCache())
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_grouped_mm(x[:, :24].contiguous(), w[:, :, :24].contiguous(), offs, FP8WeightCache())


@pytest.mark.skipif(not (torch.cuda.is_available() and scaled_grouped_mm_supported(torch.device("cuda"))),
                    reason="torch._scaled_grouped_mm needs a CUDA sm90/sm100 GPU (CPU CI uses the emulation)")
def test_cuda_kernel_matches_emulation():
    from megatron_esft.experts import fp8

    counts, k, n = [5, 0, 130, 61], 2048, 1408
    x, w, offs = (t.cuda() for t in _groups(counts, k, n))
    xq, xs = fp8.quantize_lastdim(x)
    wq, ws = fp8.quantize_lastdim(w)
    y = fp8._scaled_mm(xq, wq.transpose(-2, -1), xs, ws, offs)
    ref = fp8._emulated_scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs)
    assert _rel(y, ref) < 1e-2


def test_weight_cache_forgets_freed_weights():
    """A cached weight that is freed leaves no entry behind, and a new weight (possibly at the same address, with the
    same shape and version) gets its own quantization."""
    cache = FP8WeightCache("all")
    first = (torch.randn(2, 16, 32) * 0.1).bfloat16()
    cache.get(first, "nk")
    assert cache.nbytes() > 0
    del first
    assert cache.nbytes() == 0  # the entry went with its weight
    second = torch.full((2, 16, 32), 0.5).bfloat16()
    q, s = cache.get(second, "nk")
    torch.testing.assert_close((q.float() * s[..., None]), second.float())
