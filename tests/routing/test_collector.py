"""RoutingStatsCollector on a real (tiny) Megatron-Core MoE GPTModel, one process: checked against an independent
float64 numpy computation from the routers' inputs and weights, padding exclusion, gate kinds."""

import numpy as np
import pytest
import torch
from routing_tiny_model import EXPERTS, SEQ, TOPK, VOCAB, build_tiny_moe, micro_batches

from megatron_esft.parallel import ParallelConfig, initialize
from megatron_esft.routing.collector import RoutingStatsCollector, find_routers
from megatron_esft.routing.forward import forward_only


@pytest.fixture(scope="module")
def single_rank():
    initialize(ParallelConfig(), seed=1234)


def _numpy_reference(model, batches, gate, score_function):
    """Capture each router's input, then route in numpy: logits, score function, top-k, gate values, sums."""
    captured = {}
    hooks = [r.register_forward_pre_hook(lambda mod, args: captured.setdefault(mod.layer_number, []).append(
        args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy())) for r in find_routers(model)]
    forward_only([model], batches)
    for h in hooks:
        h.remove()
    valid = np.concatenate([b["valid"].t().reshape(-1).numpy() for b in batches])  # router order: [s, b]
    out = {}
    for router in find_routers(model):
        x = np.concatenate(captured[router.layer_number])[valid]
        logits = x @ router.weight.detach().double().numpy().T
        if score_function == "softmax":
            e = np.exp(logits - logits.max(1, keepdims=True))
            scores = e / e.sum(1, keepdims=True)
            choose = scores
        else:
            scores = 1 / (1 + np.exp(-logits))
            choose = scores + router.expert_bias.double().numpy()
        top = np.argsort(-choose, axis=1, kind="stable")[:, :TOPK]
        chosen = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(chosen, top, True, axis=1)
        gates = np.where(chosen, scores, 0.0)
        if gate == "normalized":
            gates = gates / gates.sum(1, keepdims=True)
        out[str(router.layer_number - 1)] = (chosen.sum(0), gates.sum(0), len(x))
    return out


@pytest.mark.parametrize("score_function, gate", [("softmax", "raw"), ("softmax", "normalized"), ("sigmoid", "raw")])
def test_collector_matches_numpy_routing(single_rank, score_function, gate):
    torch.manual_seed(0)
    model = build_tiny_moe(ParallelConfig(), score_function=score_function)
    if score_function == "sigmoid":
        for router in find_routers(model):  # V3-style selection bias: chooses experts, never enters gate values
            router.expert_bias.copy_(torch.randn(EXPERTS) * 0.3)
    batches = micro_batches(4, seed=1)
    with RoutingStatsCollector(model, gate=gate) as collector:
        forward_only([model], batches, on_micro_batch=lambda b: collector.set_valid_mask(b["valid"]))
    scores = collector.reduce()
    reference = _numpy_reference(model, batches, gate, score_function)
    assert scores.layers == ["1", "2", "3"] and scores.topk == TOPK  # layer 0 is dense
    for li, key in enumerate(scores.layers):
        counts, gate_sums, n = reference[key]
        assert scores.num_tokens[li] == n == sum(int(b["valid"].sum()) for b in batches)
        np.testing.assert_array_equal(scores.counts[li], counts)
        np.testing.assert_allclose(scores.gate_sums[li], gate_sums, rtol=1e-12)
    np.testing.assert_allclose(scores.token_scores.sum(1), 1.0, rtol=1e-12)
    if gate == "normalized":
        np.testing.assert_allclose(scores.gate_scores.sum(1), 1.0, rtol=1e-12)
    else:
        assert (scores.gate_scores.sum(1) < 1).all() or score_function == "sigmoid"


def test_padding_is_excluded(single_rank):
    torch.manual_seed(0)
    model = build_tiny_moe(ParallelConfig())
    gen = torch.Generator().manual_seed(5)
    lengths = [SEQ, 5, 11, 1]
    tokens = torch.randint(1, VOCAB, (len(lengths), SEQ), generator=gen)
    valid = torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]

    def collect(batches, use_padding_mask=False):
        with RoutingStatsCollector(model) as collector:
            if use_padding_mask:  # the router's own padding_mask argument (True = padding), via GPTModel
                with torch.no_grad():
                    for b in batches:
                        model(b["tokens"], torch.arange(SEQ)[None].expand_as(b["tokens"]), None,
                              padding_mask=~b["valid"])
            else:
                forward_only([model], batches, on_micro_batch=lambda b: collector.set_valid_mask(b["valid"]))
        return collector.reduce()

    padded = collect([{"tokens": tokens.masked_fill(~valid, 7), "valid": valid}])
    via_router_arg = collect([{"tokens": tokens.masked_fill(~valid, 7), "valid": valid}], use_padding_mask=True)
    # independent: every sequence alone, unpadded (causal attention: padding after a token cannot change it)
    alone = collect([{"tokens": tokens[i:i + 1, :n], "valid": torch.ones(1, n, dtype=torch.bool)}
                     for i, n in enumerate(lengths)])
    everything = collect([{"tokens": tokens.masked_fill(~valid, 7), "valid": torch.ones_like(valid)}])
    assert (padded.num_tokens == sum(lengths)).all() and (everything.num_tokens == len(lengths) * SEQ).all()
    for other in (alone, via_router_arg):
        np.testing.assert_array_equal(padded.counts, other.counts)
        np.testing.assert_allclose(padded.gate_sums, other.gate_sums, rtol=1e-12)
    assert not np.array_equal(padded.counts, everything.counts)


def test_detach_restores_router(single_rank):
    model = build_tiny_moe(ParallelConfig())
    routers = find_routers(model)
    collector = RoutingStatsCollector(model).attach()
    assert all("gating" in r.__dict__ for r in routers)
    collector.detach()
    assert not any("gating" in r.__dict__ or r._forward_hooks for r in routers)
    batch = micro_batches(1)
    forward_only([model], batch)  # no hooks: nothing counted
    assert int(collector.num_tokens.sum()) == 0
