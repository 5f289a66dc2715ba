"""Frozen-aware grouped experts vs Megatron-Core's SequentialMLP (reference), fp32: losses and gradients equal."""

import pytest
import torch
from tiny import (batch, build_model, copy_sequential_to_grouped, expert_grads, freeze_grouped, freeze_sequential,
                  loss_of, moe_experts, tiny_config)

SPLITS = {
    "all": {2: list(range(8)), 3: list(range(8))},
    "none": {},
    "mixed": {2: [1, 5, 6], 3: [0, 7]},  # non-contiguous: exercises the row regrouping
}


def _pair(config, trainable):
    torch.manual_seed(0)
    ref = build_model(config, grouped=False)
    ours = build_model(config, grouped=True)
    copy_sequential_to_grouped(ref, ours)
    freeze_sequential(ref, trainable)
    freeze_grouped(ours, trainable)
    return ref, ours


def _non_expert_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if ".experts." not in n}


@pytest.mark.parametrize("split,fused", [(s, False) for s in sorted(SPLITS)] + [("mixed", True)])
def test_loss_and_grads_match_sequential(mcore, split, fused):
    """fused: Megatron's compiled SwiGLU (bias_activation_fusion) in both, SequentialMLP's per-expert
    `weighted_bias_swiglu_impl` against the grouped experts' one call per group."""
    trainable = SPLITS[split]
    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1], bias_activation_fusion=fused)
    ref, ours = _pair(config, trainable)
    data = batch(seed=1)
    loss_ref, loss_ours = loss_of(ref, data), loss_of(ours, data)
    assert abs(loss_ref.item() - loss_ours.item()) <= 1e-6
    loss_ref.backward()
    loss_ours.backward()
    g_ref, g_ours = expert_grads(ref), expert_grads(ours)
    assert g_ref.keys() == g_ours.keys()
    n_trainable = 0
    for key, g in g_ref.items():
        layer, j, _ = key
        if j in trainable.get(layer, ()):
            n_trainable += 1
            assert g is not None and g_ours[key] is not None, key
            torch.testing.assert_close(g_ours[key], g, rtol=0, atol=1e-6)
        else:
            assert g is None and g_ours[key] is None, key
    assert n_trainable == 2 * sum(len(v) for v in trainable.values())
    # everything else (attention, router, shared experts, embeddings) also gets identical gradients
    other_ref, other_ours = _non_expert_grads(ref), _non_expert_grads(ours)
    assert other_ref.keys() == other_ours.keys()
    for name, g in other_ref.items():
        torch.testing.assert_close(other_ours[name], g, rtol=0, atol=1e-6, msg=name)
    # frozen groups are Parameters without requires_grad (nothing for DDP / the optimizer to see)
    for _, experts in moe_experts(ours):
        for proj in ("fc1", "fc2"):
            assert getattr(experts, f"{proj}_frozen").requires_grad is False
            assert getattr(experts, f"{proj}_frozen").grad is None


def test_fused_swiglu_is_used_and_rejects_other_activations(mcore, monkeypatch):
    from megatron.core.fusions import fused_bias_swiglu

    calls = []
    original = fused_bias_swiglu.weighted_bias_swiglu_impl
    monkeypatch.setattr(fused_bias_swiglu, "weighted_bias_swiglu_impl", lambda *a: calls.append(1) or original(*a))
    model = build_model(tiny_config(bias_activation_fusion=True), grouped=True)
    loss_of(model, batch(seed=3)).backward()
    assert calls  # the grouped experts went through Megatron's fused kernel
    with pytest.raises(ValueError, match="plain SwiGLU"):
        build_model(tiny_config(bias_activation_fusion=True, activation_func_clamp_value=7.0), grouped=True)


def _float64_experts(x, counts, probs, fc1, fc2):
    """Independent reference: per-expert SwiGLU MLP in float64, probs applied after the activation."""
    out, start = [], 0
    for e, n in enumerate(counts):
        h = x[start:start + n].double() @ fc1[e].double().T
        gate, up = h.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up * probs[start:start + n].double().unsqueeze(-1)
        out.append(act @ fc2[e].double().T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("trainable", [[0, 1, 2, 3], [], [3, 0], [2]])
def test_module_zero_tokens_and_empty_groups(mcore, trainable):
    """Direct module call with experts that get zero tokens (and all tokens on one expert) vs a float64 loop."""
    config = tiny_config()
    ours = build_model(config, grouped=True).decoder.layers[1].mlp.experts
    ours.__init__(4, config, ours.submodules)  # 4 local experts
    ours.set_trainable_experts(trainable)
    fc1 = torch.stack([ours.expert_weight("fc1", j) for j in range(4)]).detach()
    fc2 = torch.stack([ours.expert_weight("fc2", j) for j in range(4)]).detach()
    for counts in ([3, 0, 5, 2], [0, 0, 0, 7], [0, 0, 0, 0]):
        x = torch.randn(sum(counts), config.hidden_size, requires_grad=True)
        probs = torch.rand(sum(counts))
        out, bias = ours(x, torch.tensor(counts), probs)
        assert bias is None and out.shape == x.shape
        torch.testing.assert_close(out.double(), _float64_experts(x, counts, probs, fc1, fc2), rtol=1e-5, atol=1e-6)
        out.sum().backward()  # an expanded (stride-0) output gradient must work
        for j in trainable:  # trainable experts always get a gradient (zero when they had no tokens)
            group, row = ours.placement(j)
            grad = getattr(ours, f"fc1_{group}").grad[row]
            assert grad is not None and (grad.abs().sum() == 0) == (counts[j] == 0)
        for p in ours.parameters():
            p.grad = None


def test_set_trainable_experts_keeps_values(mcore):
    ours = build_model(tiny_config(), grouped=True).decoder.layers[1].mlp.experts
    before = {k: v.clone() for k, v in ours.state_dict().items() if v is not None}
    ours.set_trainable_experts([6, 2, 3])
    assert ours.trainable_local_experts == [2, 3, 6] and ours.frozen_local_experts == [0, 1, 4, 5, 7]
    assert ours.placement(6) == ("trainable", 2) and ours.placement(4) == ("frozen", 2)
    assert tuple(ours.fc1_trainable.shape) == (3, 32, 32) and tuple(ours.fc2_frozen.shape) == (5, 32, 16)
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["fc1_trainable", "fc2_trainable"]
    with pytest.raises(ValueError):
        ours.set_trainable_experts([8])
