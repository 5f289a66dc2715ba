"""Selective activation recompute (`--recompute-granularity selective --recompute-modules ...`, Megatron-Core's
TransformerConfig.recompute_modules) on the model the trainer builds: a tiny DeepSeek-V2 (MLA, a dense first layer,
shared experts) with the frozen-aware grouped experts. Every module must give the same loss and gradients as no
recompute, with ESFT (through the hang guard) and full fine-tuning, and must really keep fewer activations."""

import pytest
import torch

from megatron_esft.errors import UserError
from megatron_esft.esft import freeze
from megatron_esft.esft.expert_config import ExpertConfig
from megatron_esft.esft.hang_guard import install_hang_guard
from megatron_esft.training.arguments import RECOMPUTE_MODULES

ECFG = {"1": [0, 2], "2": [5]}


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _cfg():
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    return parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                   vocab=64)))


def _run(modules, mode: str, experts: str = "grouped", token_counts: str = "host"):
    """(loss, {trainable parameter: grad}, bytes of activations saved for backward) of one step; `modules` "full"
    recomputes whole layers."""
    from megatron_esft.experts import set_expert_token_counts
    from megatron_esft.models.provider import build_model

    overrides = {} if modules is None else dict(recompute_granularity="selective", recompute_modules=list(modules))
    if modules == "full":
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, experts=experts, config_overrides=overrides)
    ecfg = ExpertConfig(dict(ECFG)) if mode == "esft" else None
    freeze.apply_finetune_mode(model, mode, ecfg)
    set_expert_token_counts(model, token_counts)
    install_hang_guard(model, freeze.first_trainable_layer_number(ecfg, mode, ["1", "2"]))
    saved = []
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).float().mean()
    # what the saved tensors hold at the end of the forward pass (a recompute releases its outputs' storage then)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    held = sum(n for ptr, n in storages.items() if ptr not in params)
    saved.clear()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    return loss.detach(), grads, held


@pytest.mark.parametrize("mode", ["esft", "full"])
def test_each_recompute_module_gives_the_same_step_with_fewer_saved_activations(mcore, mode):
    want_loss, want_grads, want_bytes = _run(None, mode)
    assert all(g.abs().sum() > 0 for g in want_grads.values())
    for modules in [[m] for m in RECOMPUTE_MODULES] + [list(RECOMPUTE_MODULES)]:
        loss, grads, saved = _run(modules, mode)
        assert torch.equal(loss, want_loss), modules
        assert grads.keys() == want_grads.keys(), modules
        for name, grad in want_grads.items():
            # fp32, summed in another order where a recompute runs its own backward (norm weights)
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8, msg=f"{modules}: {name}")
        # ESFT: frozen paths save nothing anyway ("mlp" is the dense first layer's; the shared experts are frozen),
        # and with "layernorm" the hang guard sits one attention block lower (more saved at this tiny size)
        if mode == "full" or modules[0] not in ("mlp", "shared_experts", "layernorm"):
            assert saved < want_bytes, (modules, saved, want_bytes)


@pytest.mark.parametrize("modules", [None, "full", ["moe", "moe_act", "layernorm"]])
def test_device_token_counts_give_the_same_step_under_recompute(mcore, modules):
    """--moe-token-counts device (experts/device_counts.py) with ESFT: the same loss and gradients bit for bit as the
    host counts, also where the experts' forward runs again in backward (whole layers, the MoE block)."""
    want_loss, want_grads, _ = _run(modules, "esft")
    loss, grads, _ = _run(modules, "esft", token_counts="device")
    assert torch.equal(loss, want_loss) and grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.equal(grads[name], grad), name


def test_moe_recompute_needs_the_hang_guard_in_esft(mcore):
    """Megatron recomputes the MoE layer in a reentrant checkpoint: with everything upstream frozen its input does
    not require grad, so without the guard the first MoE layer's selected experts would get no gradient."""
    from megatron_esft.models.provider import build_model

    torch.manual_seed(0)
    model = build_model(_cfg(), experts="grouped",
                        config_overrides=dict(recompute_granularity="selective", recompute_modules=["moe"]))
    freeze.apply_finetune_mode(model, "esft", ExpertConfig(dict(ECFG)))
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).float().mean()
    assert not loss.requires_grad  # no selected expert of either MoE layer would train


def test_moe_act_needs_the_grouped_experts(mcore):
    with pytest.raises(UserError, match="moe_act needs the grouped experts"):
        _run(["moe_act"], "esft", experts="sequential")
    _run(["layernorm"], "esft", experts="sequential")  # the other modules are Megatron-Core's own
