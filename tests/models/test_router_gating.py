"""The frozen-aware router gating (models/routing.use_frozen_aware_gating): a frozen router's gating GEMM gives
Megatron-Core's logits and input gradient bit for bit without keeping its input for backward; a trainable router
keeps Megatron's own path."""

import pytest
import torch

from megatron_esft.esft import freeze
from megatron_esft.esft.expert_config import ExpertConfig

ECFG = {"1": [0, 2], "2": [5]}


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _routers(arch, trainable_router: bool):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    cfg = parse_hf_config(hf_config_dict(TinySpec(arch=arch, layers=3, hidden=32, experts=8, moe_ffn=16, vocab=64)))
    torch.manual_seed(0)
    model = build_model(cfg, experts="grouped")
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG), non_expert_modules=trainable_router))
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2 and all(type(r).__name__.startswith("FrozenAware") for r in routers)
    return routers


def _gate(router, gating, x):
    """(logits, input grad, shapes of the tensors autograd saved) of one gating call."""
    x = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logits = gating(router, x)
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype))
    return logits.detach(), x.grad, saved


@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v3"])  # softmax router; sigmoid router with expert bias
def test_frozen_router_gating_equals_megatron_and_keeps_no_input(mcore, arch):
    from megatron.core.transformer.moe.router import TopKRouter

    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0))
    for router in _routers(arch, trainable_router=False):
        ours, want = _gate(router, type(router).gating, x), _gate(router, TopKRouter.gating, x)
        assert torch.equal(ours[0], want[0]) and torch.equal(ours[1], want[1])
        assert (16, 2, 32) in want[2]  # Megatron keeps the input ...
        assert all(shape[-1] != 32 or shape == tuple(router.weight.shape) for shape in ours[2])  # ... ours: weight


def test_trainable_router_keeps_megatrons_gating(mcore):
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0))
    for router in _routers("deepseek-v2", trainable_router=True):
        router.weight.grad = None
        _, _, saved = _gate(router, type(router).gating, x)
        assert (16, 2, 32) in saved and router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_frozen_bf16_router_converts_its_weight_once_and_again_after_a_load(mcore):
    """A bf16 router gates in fp32 (moe_router_dtype): the fp32 copy of a frozen weight is made once, not in every
    forward, and made again when a checkpoint load copies new values into the weight."""
    from megatron.core.transformer.moe.router import TopKRouter

    router = _routers("deepseek-v2", trainable_router=False)[0]
    router.config.moe_router_dtype = "fp32"
    router.weight.data = router.weight.data.bfloat16()
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    first = _gate(router, type(router).gating, x)
    copy = router._esft_gating_weight[1]
    assert copy.dtype == torch.float32
    second = _gate(router, type(router).gating, x)
    assert router._esft_gating_weight[1] is copy and torch.equal(first[0], second[0])
    want = _gate(router, TopKRouter.gating, x)
    assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[1])
    with torch.no_grad():  # what load_state_dict does: an in-place copy (same storage, a new autograd version)
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(3)))
    loaded, want = _gate(router, type(router).gating, x), _gate(router, TopKRouter.gating, x)
    assert router._esft_gating_weight[1] is not copy
    assert torch.equal(loaded[0], want[0]) and not torch.equal(loaded[0], first[0])
