"""Expert config -> frozen Megatron-Core model (official `to_esft` semantics) and the hang guard, single rank."""

import pytest
import torch

from megatron_esft.errors import UserError
from megatron_esft.esft import freeze
from megatron_esft.esft.expert_config import ExpertConfig
from megatron_esft.esft.hang_guard import install_hang_guard

ECFG = {"1": [0, 2], "2": [5]}


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _model(arch="deepseek-v2", experts="grouped", **overrides):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    get_moe_layer_wise_logging_tracker().clear()
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch=arch, layers=3, hidden=32, experts=8, moe_ffn=16, vocab=64)))
    torch.manual_seed(0)
    return cfg, build_model(cfg, experts=experts, config_overrides=overrides)


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and p.numel())


def _expert_rows(model):
    """(layer key, global expert) of every trainable routed expert, read from the modules."""
    out = set()
    for number, layer in freeze.decoder_layers(model):
        if freeze.is_moe_layer(layer):
            experts = layer.mlp.experts
            for j in range(layer.mlp.num_local_experts):
                w = experts.expert_weight("fc1", j) if hasattr(experts, "expert_weight") else \
                    experts.local_experts[j].linear_fc1.weight
                params = [p for p in experts.parameters() if p.requires_grad]
                if any(w.data_ptr() >= p.data_ptr() and w.data_ptr() < p.data_ptr() + p.numel() * p.element_size()
                       for p in params):
                    out.add((number - 1, j))
    return out


@pytest.mark.parametrize("impl", ["grouped", "sequential"])
def test_esft_freezes_everything_but_selected_experts(mcore, impl):
    cfg, model = _model(experts=impl)
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG)))
    assert _expert_rows(model) == {(1, 0), (1, 2), (2, 5)}
    assert all(".mlp.experts." in n and "shared" not in n for n in _trainable(model))
    report = freeze.count_trainable(model, cfg.num_layers)
    assert report.per_layer == {"0": 0, "1": 2 * cfg.params_per_expert, "2": cfg.params_per_expert}
    assert report.total == report.routed_experts == 3 * cfg.params_per_expert and report.other == 0
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_flags_follow_the_official_to_esft(mcore):
    cfg, model = _model()
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG), shared_experts=True))
    names = _trainable(model)
    assert any("shared_experts" in n for n in names) and not any("router" in n or "attention" in n for n in names)
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG), non_expert_modules=True))
    names = _trainable(model)
    assert any("router" in n for n in names) and any("self_attention" in n for n in names)
    assert any("embedding" in n for n in names) and any("output_layer" in n for n in names)
    assert not any("shared_experts" in n for n in names)  # official: shared experts follow their own flag
    assert _expert_rows(model) == {(1, 0), (1, 2), (2, 5)}  # unselected experts stay frozen
    freeze.apply_finetune_mode(model, "full", None)
    assert all(p.requires_grad for p in model.parameters() if p.numel())


def test_v3_router_bias_must_not_move_when_frozen(mcore):
    _, model = _model(arch="deepseek-v3", moe_router_bias_update_rate=1e-3)
    with pytest.raises(UserError, match="expert bias would still move"):
        freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG)))
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG), non_expert_modules=True))  # router trains


def _grads(model, guard: bool):
    ecfg = ExpertConfig(dict(ECFG))
    freeze.apply_finetune_mode(model, "esft", ecfg)
    if guard:
        install_hang_guard(model, freeze.first_trainable_layer_number(ecfg, "esft", ["1", "2"]))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens).sum()
    if not loss.requires_grad:
        return None
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.numel()}


def test_hang_guard_keeps_full_recompute_training(mcore):
    """Full activation recompute runs layers in a reentrant checkpoint: with everything upstream frozen, no input
    requires grad and the selected experts get no gradient at all. The guard fixes it, with the same gradients as
    without recompute."""
    _, plain = _model()
    reference = _grads(plain, guard=True)
    _, unguarded = _model(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert _grads(unguarded, guard=False) is None
    _, guarded = _model(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    got = _grads(guarded, guard=True)
    assert set(got) == set(reference)
    for name, grad in reference.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-9)
