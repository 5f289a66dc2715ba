"""The fused output layer + cross-entropy (models/linear_cross_entropy.py, fusion "linear_cross_entropy"): the loss
and hidden-state gradient of a float64 reference and of Megatron-Core's output layer + loss, chunk by chunk, with no
full-vocabulary tensor kept for backward; GPTModel's own path wherever it does not apply."""

import pytest
import torch
import torch.nn.functional as F

from megatron_esft.esft import freeze
from megatron_esft.esft.expert_config import ExpertConfig
from megatron_esft.models.linear_cross_entropy import chunk_rows, linear_cross_entropy

S, B, H, V = 13, 2, 24, 50


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3], labels[1, 0] = -100, V  # outside the vocabulary: Megatron's TP-1 loss is the log-sum-exp
    upstream = torch.rand(B, S, generator=g)  # the trainer's loss mask / token count, per token
    return hidden, weight, labels, upstream


def _reference(hidden, weight, labels, upstream):
    """float64: loss [b, s] and d(sum(upstream * loss)) / d hidden."""
    x = hidden.detach().double().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", x, weight.double())
    valid = (labels >= 0) & (labels < V)
    picked = logits.gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0]
    loss = torch.logsumexp(logits, -1) - torch.where(valid, picked, 0)
    (loss * upstream.double()).sum().backward()
    return loss, x.grad


@pytest.mark.parametrize("rows", [None, 5, 64])  # one chunk; chunks that do not divide s*b = 26; one larger chunk
def test_matches_float64_reference_fp32(rows):
    hidden, weight, labels, upstream = _inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, labels, rows)
    (loss * upstream).sum().backward()
    want_loss, want_grad = _reference(hidden, weight, labels, upstream)
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), want_grad, rtol=1e-5, atol=1e-7)


def test_bf16_within_bf16_rounding():
    hidden, weight, labels, upstream = _inputs(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, labels, 7)
    (loss * upstream).sum().backward()
    want_loss, want_grad = _reference(hidden, weight, labels, upstream)
    assert hidden.grad.dtype == torch.bfloat16
    # the logits are a bf16 GEMM's output, as Megatron's output layer gives them
    assert ((loss.double() - want_loss).abs() / want_loss.abs()).max() < 2e-2
    assert (hidden.grad.double() - want_grad).norm() / want_grad.norm() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled (Triton) loss kernel")
def test_cuda_compiled_kernel_matches_float64_reference():
    from megatron_esft.models import linear_cross_entropy as lce

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1000, 2, 256, generator=g).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(8192, 256, generator=g) / 16).cuda().bfloat16()
    labels = torch.randint(0, 8192, (2, 1000), generator=g).cuda()
    upstream = torch.rand(2, 1000, generator=g).cuda()
    loss = linear_cross_entropy(hidden, weight, labels, 512)  # 2,000 rows: three chunks of 512, one of 464
    (loss * upstream).sum().backward()
    assert lce._loss_and_logit_grad._compiled is not None and not lce._loss_and_logit_grad._failed
    x = hidden.detach().double().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", x, weight.double())
    want = torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None])[..., 0]
    (want * upstream.double()).sum().backward()
    assert ((loss.double() - want).abs() / want.abs()).max() < 2e-2
    assert (hidden.grad.double() - x.grad).norm() / x.grad.norm() < 1e-2


def test_chunks_and_frozen_weight():
    assert chunk_rows(102400) == 640 and chunk_rows(10**9) == 64
    hidden, weight, labels, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="output weight must be frozen"):
        linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 5),
                                   linear_cross_entropy(hidden, weight, labels), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- in the model (GPTModel)
@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _model(fused: bool, mode: str, dtype=torch.float32):
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                  vocab=VOCAB)))
    torch.manual_seed(0)
    model = build_model(cfg, experts="grouped", params_dtype=dtype, fusions=["linear_cross_entropy"] if fused else None)
    freeze.apply_finetune_mode(model, mode, ExpertConfig({"1": [0, 2], "2": [5]}) if mode == "esft" else None)
    return model


VOCAB = 96  # no other tensor of the tiny model has a dimension of 96


def _step(model):
    """(loss [b, s], grads of the trainable parameters, whether autograd saved a vocabulary-wide tensor)."""
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape[-1] == VOCAB) or t, lambda t: t):
        loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
    (loss.float() * torch.linspace(0, 1, 64).view(2, 32)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, any(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_esft_model_loss_and_gradients_equal_megatrons(mcore, dtype):
    from megatron_esft.models.fusions import describe

    fused_model, plain_model = _model(True, "esft", dtype), _model(False, "esft", dtype)
    assert "linear_cross_entropy" in describe(fused_model) and "linear_cross_entropy" not in describe(plain_model)
    loss, grads, keeps_logits = _step(fused_model)
    want_loss, want_grads, want_keeps_logits = _step(plain_model)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, **tol, msg=name)
    assert want_keeps_logits and not keeps_logits  # Megatron keeps the fp32 softmax [s, b, V] for backward


def test_megatrons_path_where_the_fusion_does_not_apply(mcore):
    from megatron_esft.models.fusions import describe

    fused_model, plain_model = _model(True, "full"), _model(False, "full")  # the output layer trains
    assert "linear_cross_entropy (off: output layer trains)" in describe(fused_model)
    loss, grads, _ = _step(fused_model)
    want_loss, want_grads, _ = _step(plain_model)
    assert torch.equal(loss, want_loss) and grads["output_layer.weight"] is not None
    assert all(torch.equal(grads[n], g) for n, g in want_grads.items())
    model = _model(True, "esft")
    tokens = torch.randint(0, VOCAB, (2, 8))
    logits = model(tokens, torch.arange(8).expand(2, 8), None)  # no labels: the logits
    assert logits.shape == (2, 8, VOCAB)
