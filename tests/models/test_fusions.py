"""models/fusions.py: which fusions a model/machine allows, fused vs eager models (Megatron-Core's fused SwiGLU and
its Triton MLA YaRN RoPE, run in Triton's CPU interpreter), and norm weights in the parameter dtype."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_esft.models import fusions
from megatron_esft.models.hf_config import parse_hf_config
from megatron_esft.models.tiny import TinySpec, hf_config_dict

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def mcore_single():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)


def _cfg(**fields):
    return parse_hf_config(hf_config_dict(TinySpec(**fields)))


def test_resolve_rules(monkeypatch):
    yarn_mla = _cfg(arch="deepseek-v2", yarn=True)
    assert fusions.resolve(None, yarn_mla) == () and fusions.resolve("none", yarn_mla) == ()
    # "auto" turns fusions on only where CUDA runs them; CPU runs keep the eager path
    assert fusions.resolve("auto", yarn_mla) == (("swiglu", "rope", "linear_cross_entropy")
                                                 if torch.cuda.is_available() else ())
    assert fusions.resolve(["flex_attention"], yarn_mla) == ("flex_attention",)  # opt-in only
    assert fusions.resolve(["swiglu", "swiglu"], yarn_mla) == ("swiglu",)
    assert fusions.config_fields(("rope",)) == {"bias_activation_fusion": False, "apply_rope_fusion": True}
    with pytest.raises(ValueError, match="no MLA with YaRN"):
        fusions.resolve(["rope"], _cfg(arch="deepseek-v2"))  # MLA with plain RoPE
    with pytest.raises(ValueError, match="no MLA with YaRN"):
        fusions.resolve(["rope"], _cfg(arch="deepseek-moe"))
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="need a GPU"):
            fusions.resolve(["rope"], yarn_mla)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert fusions.resolve(["rope"], yarn_mla) == ("rope",)
    with pytest.raises(ValueError, match="unknown fusion"):
        fusions.resolve(["gelu"], yarn_mla)


def test_bf16_model_keeps_norm_weights_in_bf16(mcore_single):
    from megatron_esft.models.provider import build_model

    model = build_model(_cfg(arch="deepseek-v2"), params_dtype=torch.bfloat16, experts="grouped")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 64, (1, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(tokens, torch.arange(8)[None], None)
    # torch's RMSNorm falls back to its unfused path (and says so) when input and weight dtypes differ
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]


def test_fused_model_matches_eager_model():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2", PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([sys.executable, str(HERE / "fused_model_main.py")], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    # every fused kernel ran: MLA RoPE for q and kv in each of the 3 layers, the dense MLP + 2 shared-expert SwiGLUs,
    # and the routed experts' weighted SwiGLU (one call per expert group that has experts)
    calls = result["calls"]
    assert calls["rope_q"] == 3 and calls["rope_kv"] == 3 and calls["swiglu"] == 3 and calls["weighted_swiglu"] >= 2
    assert result["describe"] == ["fused kernels: none (eager torch ops); MoE token permutation: experts", "fused kernels: swiglu, rope; MoE token permutation: experts"]
    assert result["grads"] > 30
    # fp32: same loss up to summation order, every gradient within 1e-5 relative
    assert abs(result["loss_fused"] - result["loss_eager"]) <= 1e-5 * abs(result["loss_eager"])
    assert result["max_grad_rel"] < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default ('auto') fusions run only on a GPU")
def test_cuda_auto_fusions_match_eager(mcore_single):
    """On the GPU: "auto" turns on Megatron's compiled SwiGLU and its Triton MLA RoPE (Triton ships with CUDA torch);
    a bf16 model with them gives the eager model's loss and gradients within bf16 rounding."""
    from megatron_esft.models.fusions import describe
    from megatron_esft.models.provider import build_model

    cfg = _cfg(arch="deepseek-v2", yarn=True)
    results = []
    for fusions in (None, "auto"):
        torch.manual_seed(0)
        model = build_model(cfg, params_dtype=torch.bfloat16, experts="grouped", fusions=fusions)
        if fusions is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
            # nothing is frozen here, so the chunked output layer + loss stays off (it serves a frozen output layer)
            assert describe(model) == ("fused kernels: swiglu, rope, linear_cross_entropy (off: output layer trains); "
                                       "MoE token permutation: experts")
        tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
        loss = model(tokens, torch.arange(32, device="cuda")[None].expand(2, -1), None, labels=tokens).float().mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_eager, grads_eager), (loss_fused, grads_fused) = results
    assert abs(loss_fused - loss_eager) <= 1e-2 * abs(loss_eager)
    for name, g in grads_eager.items():
        assert ((grads_fused[name] - g).norm() / g.norm().clamp_min(1e-30)).item() < 5e-2, name


def _documents(b=2, s=32):
    """document ids [b, s] of a packed batch: a few documents of different lengths, then a padding block (-1)."""
    lengths = [[9, 14, 6], [20, 7]]
    rows = []
    for row in lengths[:b]:
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
        rows.append(torch.cat([ids, torch.full((s - ids.numel(),), -1)]))
    return torch.stack(rows)


def test_flex_document_attention_matches_sdpa():
    """MLA head sizes (q/k 192, v 128): FlexAttention with the block mask of a packed batch equals masked SDPA."""
    from megatron_esft.data import build_attention_mask
    from megatron_esft.models.attention import flex_document_attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 32, 192, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 32, 128, generator=g)
    mask = build_attention_mask(_documents())
    out = flex_document_attention(q, k, v, mask, scale=0.1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.logical_not(), scale=0.1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_attention_model_matches_sdpa_model(mcore_single, monkeypatch):
    """A tiny V2 with the flex_attention fusion gives the SDPA model's logits on a packed batch (every layer went
    through FlexAttention, one block mask for all of them); with gradients on CPU it falls back to SDPA."""
    from megatron_esft.data import build_attention_mask
    from megatron_esft.models import attention
    from megatron_esft.models.fusions import describe
    from megatron_esft.models.provider import build_model

    cfg = _cfg(arch="deepseek-v2")
    torch.manual_seed(0)
    sdpa = build_model(cfg, experts="grouped")
    flex = build_model(cfg, experts="grouped", fusions=["flex_attention"])
    flex.load_state_dict(sdpa.state_dict())
    assert describe(flex) == "fused kernels: flex_attention; MoE token permutation: experts"
    assert describe(sdpa).endswith("none (eager torch ops); MoE token permutation: experts")
    documents = _documents()
    tokens = torch.randint(0, cfg.vocab_size, documents.shape, generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(n) for n in (9, 14, 6, 3)] + [torch.arange(n) for n in (20, 7, 5)])
    positions = positions.view(2, 32)
    mask = build_attention_mask(documents)
    calls, masks_built = [], []
    original_flex, original_block_mask = attention.flex_document_attention, attention._block_mask
    monkeypatch.setattr(attention, "flex_document_attention", lambda *a: calls.append(1) or original_flex(*a))
    monkeypatch.setattr(attention, "_BLOCK_MASK_CACHE", [])
    import torch.nn.attention.flex_attention as fa

    original_create = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: masks_built.append(1) or original_create(*a, **k))
    with torch.no_grad():
        logits_sdpa = sdpa(tokens, positions, mask)
        logits_flex = flex(tokens, positions, mask)
    assert len(calls) == cfg.num_layers and len(masks_built) == 1
    torch.testing.assert_close(logits_flex, logits_sdpa, rtol=1e-5, atol=1e-5)
    calls.clear()
    flex(tokens, positions, mask, labels=tokens).float().mean().backward()  # CPU + grad: SDPA (no flex backward)
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs only on a GPU")
def test_cuda_flex_attention_forward_and_backward_match_sdpa():
    from megatron_esft.data import build_attention_mask
    from megatron_esft.models.attention import flex_document_attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 16, 512, 192, generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(2, 16, 512, 128, generator=g).cuda().bfloat16().requires_grad_()
    documents = torch.repeat_interleave(torch.arange(8), torch.tensor([100, 37, 80, 64, 91, 40, 60, 40]))
    mask = build_attention_mask(documents.cuda().expand(2, -1))
    dy = torch.randn(2, 16, 512, 128, generator=g).cuda().bfloat16()
    results = []
    for fn in (lambda: flex_document_attention(q, k, v, mask),
               lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.logical_not())):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), dy)
        results.append((out.float(), [t.float() for t in grads]))
    (out_flex, grads_flex), (out_ref, grads_ref) = results
    assert ((out_flex - out_ref).norm() / out_ref.norm()).item() < 1e-2
    for a, b in zip(grads_flex, grads_ref):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
