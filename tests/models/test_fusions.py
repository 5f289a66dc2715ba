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


def test_resolve_rules():
    yarn_mla = _cfg(arch="deepseek-v2", yarn=True)
    assert fusions.resolve(None, yarn_mla) == () and fusions.resolve("none", yarn_mla) == ()
    # "auto" turns fusions on only where CUDA runs them; CPU runs keep the eager path
    assert fusions.resolve("auto", yarn_mla) == (fusions.FUSIONS if torch.cuda.is_available() else ())
    assert fusions.resolve(["swiglu", "swiglu"], yarn_mla) == ("swiglu",)
    assert fusions.config_fields(("rope",)) == {"bias_activation_fusion": False, "apply_rope_fusion": True}
    with pytest.raises(ValueError, match="no MLA with YaRN"):
        fusions.resolve(["rope"], _cfg(arch="deepseek-v2"))  # MLA with plain RoPE
    with pytest.raises(ValueError, match="no MLA with YaRN"):
        fusions.resolve(["rope"], _cfg(arch="deepseek-moe"))
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
    assert result["describe"] == ["fused kernels: none (eager torch ops)", "fused kernels: swiglu, rope"]
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
            assert describe(model.config) == "fused kernels: swiglu, rope"
        tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
        loss = model(tokens, torch.arange(32, device="cuda")[None].expand(2, -1), None, labels=tokens).float().mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_eager, grads_eager), (loss_fused, grads_fused) = results
    assert abs(loss_fused - loss_eager) <= 1e-2 * abs(loss_eager)
    for name, g in grads_eager.items():
        assert ((grads_fused[name] - g).norm() / g.norm().clamp_min(1e-30)).item() < 5e-2, name
