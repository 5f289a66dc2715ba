"""experts/permutation.py: the gather permutation against Megatron-Core's `permute` / `unpermute` (float64 and bf16),
the ops it runs (no atomics, no data-dependent sizes), and whole MoE models dispatching with it against Megatron's
own MoELayer (same weights): loss and every gradient."""

import collections

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import permute, unpermute
from tiny import batch, build_model, loss_of, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_esft.experts.permutation import (GatherPermutationAlltoAllDispatcher, permute_tokens,
                                               set_moe_permutation, topk_permutation, unpermute_tokens)

# ops that either accumulate with atomics on a GPU or have a data-dependent output size (a host sync)
ATOMIC_OR_SYNCING = {"index_add", "scatter_add", "masked_select", "nonzero", "_local_scalar_dense", "index_put"}


class OpNames(TorchDispatchMode):
    """The aten ops dispatched while active: how often each ran (`counts`), by name without overload or in-place
    suffix, and which ran (`names`)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    @property
    def names(self) -> set:
        return set(self.counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0].rstrip("_")] += 1
        return func(*args, **(kwargs or {}))


def _routing(num_tokens, num_experts, topk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64)
    chosen = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = (torch.softmax(scores, dim=-1) * routing_map).to(dtype)
    return routing_map, probs


def _round_trip(tokens, probs, routing_map, topk, ours: bool, weights):
    """permute -> rows * weights * probs (stands in for the experts) -> unpermute."""
    if ours:
        rows, row_probs, mapping = permute_tokens(tokens, probs, routing_map, topk)
        return unpermute_tokens(rows * weights * row_probs.unsqueeze(-1).to(rows.dtype), mapping), rows, row_probs
    rows, row_probs, sorted_indices = permute(tokens, routing_map, probs=probs, num_out_tokens=tokens.shape[0] * topk)
    out = unpermute(rows * weights * row_probs.unsqueeze(-1).to(rows.dtype), sorted_indices, tokens.shape,
                    routing_map=routing_map)
    return out, rows, row_probs


@pytest.mark.parametrize("num_tokens,num_experts,topk", [(37, 8, 3), (1, 4, 2), (64, 16, 1), (20, 6, 6), (256, 64, 6)])
def test_matches_megatron_permute_and_unpermute_float64(num_tokens, num_experts, topk):
    routing_map, probs = _routing(num_tokens, num_experts, topk)
    tokens = torch.randn(num_tokens, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(num_tokens * topk, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(num_tokens, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = {}
    for ours in (False, True):
        x, p = tokens.clone().requires_grad_(), probs.clone().requires_grad_()
        out, rows, row_probs = _round_trip(x, p, routing_map, topk, ours, weights)
        (out * grad_out).sum().backward()
        results[ours] = (out.detach(), rows.detach(), row_probs.detach(), x.grad, p.grad)
    # the same rows in the same order (by expert, then token), and the same results up to float64 summation order
    assert torch.equal(results[True][1], results[False][1]) and torch.equal(results[True][2], results[False][2])
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_topk_permutation_is_a_bijection_in_megatron_order():
    routing_map, _ = _routing(50, 10, 4)
    token_of_row, expert_of_row, row_of_pair = topk_permutation(routing_map, 4)
    assert torch.equal(token_of_row, torch.arange(50).expand(10, 50).masked_select(routing_map.T))
    assert torch.equal(expert_of_row, torch.arange(10).repeat_interleave(routing_map.sum(0)))
    assert torch.equal(torch.sort(row_of_pair).values, torch.arange(200))
    assert torch.equal(token_of_row[row_of_pair], torch.arange(50).repeat_interleave(4))  # pair t*k+j holds token t


def test_bf16_round_trip_as_accurate_as_megatron():
    """The gather sums a token's k bf16 rows in fp32 and rounds once. On a GPU Megatron's bf16 atomics round after
    every add; torch's CPU scatter_add accumulates in fp32 too, so here the two agree up to the fp32 summation order
    (a bf16 accumulator, rounding after every add, would have about twice the error)."""
    routing_map, probs = _routing(512, 64, 6, dtype=torch.float32)
    tokens = torch.randn(512, 256, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(512 * 6, 256, generator=torch.Generator().manual_seed(5))
    exact, _, _ = _round_trip(tokens.double(), probs.double(), routing_map, 6, True, weights.double())
    errors = {}
    for ours in (False, True):
        out, _, _ = _round_trip(tokens.bfloat16(), probs, routing_map, 6, ours, weights.bfloat16())
        assert out.dtype == torch.bfloat16
        errors[ours] = ((out.double() - exact).norm() / exact.norm()).item()
    assert errors[True] <= errors[False] * 1.01 and errors[True] < 1e-2, errors


def test_no_atomic_or_syncing_ops_where_megatron_has_them():
    routing_map, probs = _routing(64, 16, 4, dtype=torch.float32)
    weights = torch.randn(256, 8)
    ops = {}
    for ours in (False, True):
        x, p = torch.randn(64, 8, requires_grad=True), probs.clone().requires_grad_()
        with OpNames() as seen:
            out, _, _ = _round_trip(x, p, routing_map, 4, ours, weights)
            out.sum().backward()
        ops[ours] = seen.names
    assert {"masked_select", "scatter_add", "index_add"} <= ops[False]  # the check can see them
    assert not (ATOMIC_OR_SYNCING - {"index_add"}) & ops[True], ops[True]
    # the only index_add left is the backward of the T*k probabilities' gather (scalars, not rows): check its size
    x, p = torch.randn(64, 8, requires_grad=True), probs.clone().requires_grad_()
    out, _, _ = _round_trip(x, p, routing_map, 4, True, weights)
    x.grad = None
    p.requires_grad_(False)
    with OpNames() as seen:
        _round_trip(x, p, routing_map, 4, True, weights)[0].sum().backward()
    assert not ATOMIC_OR_SYNCING & seen.names, seen.names


def _model_pair(config, seed=0):
    torch.manual_seed(seed)
    ref = build_model(config, grouped=True)
    ours = build_model(config, grouped=True, gather_permutation=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("shared_overlap", [False, True])
def test_model_with_gather_permutation_matches_megatron_moe_layer(mcore, shared_overlap):
    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1], moe_shared_expert_overlap=shared_overlap)
    ref, ours = _model_pair(config)
    assert type(ref.decoder.layers[1].mlp.token_dispatcher) is not GatherPermutationAlltoAllDispatcher
    assert set_moe_permutation(ours, "gather") == 2
    data = batch(seed=1)
    loss_ref = loss_of(ref, data)
    with OpNames() as seen:
        loss_ours = loss_of(ours, data)
        loss_ours.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=0)
    grads_ref = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads_ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert not {"masked_select", "scatter_add"} & seen.names, seen.names
    # switched back to Megatron's permutation, the same model runs Megatron's ops
    set_moe_permutation(ours, "megatron")
    with OpNames() as seen:
        loss_of(ours, data).backward()
    assert {"masked_select", "scatter_add"} <= seen.names


def test_token_dropping_falls_back_to_megatron(mcore):
    config = tiny_config(num_layers=2, moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")
    ref, ours = _model_pair(config, seed=3)
    data = batch(seed=2)
    with OpNames() as seen:
        loss_ours = loss_of(ours, data)
    assert "masked_select" in seen.names  # Megatron's path: dropping makes the row count data-dependent
    torch.testing.assert_close(loss_ours, loss_of(ref, data), rtol=0, atol=0)


def test_unknown_permutation_is_refused(mcore):
    with pytest.raises(ValueError, match="unknown MoE permutation 'fast'"):
        set_moe_permutation([], "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels and host syncs exist only on a GPU")
def test_cuda_bf16_matches_megatron_without_host_syncs():
    """On the GPU: bf16 rows and gradients as Megatron's (its atomics round per add, so within bf16 rounding), and
    the gather permutation's forward and backward run with sync debug mode set to raise on any host sync."""
    routing_map, probs = _routing(4096, 64, 6, dtype=torch.float32)
    routing_map, probs = routing_map.cuda(), probs.cuda()
    g = torch.Generator().manual_seed(6)
    tokens = torch.randn(4096, 256, generator=g).cuda().bfloat16()
    weights = torch.randn(4096 * 6, 256, generator=g).cuda().bfloat16()
    results = {}
    for ours in (False, True):
        x, p = tokens.clone().requires_grad_(), probs.clone().requires_grad_()
        if ours:
            _round_trip(x, p, routing_map, 6, True, weights)  # warm-up: first calls may load kernels
            x.grad = p.grad = None
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, _, _ = _round_trip(x, p, routing_map, 6, ours, weights)
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[ours] = (out.float(), x.grad.float(), p.grad)
    for got, want in zip(results[True], results[False]):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_a_token_with_fewer_than_k_experts_is_refused():
    routing_map, probs = _routing(8, 4, 2)
    routing_map[3] = False  # e.g. a token-dropping router: dropless top-k is what the gather permutation assumes
    with pytest.raises(RuntimeError, match="exactly top-k"):
        permute_tokens(torch.randn(8, 4, dtype=torch.float64), probs, routing_map, 2)


def test_index_constants_made_once_and_usable_after_inference_mode():
    """The permutation's index constants (experts/permutation.index_range) are made once per size and device; made
    first under inference_mode (an evaluation pass), they still serve a training step (an inference tensor could
    not be saved for backward), with the same results as freshly made ones."""
    from megatron_esft.experts import permutation

    permutation._INDEX_CONSTANTS.clear()
    routing_map, probs = _routing(29, 8, 3)
    tokens = torch.randn(29, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        permute_tokens(tokens, probs, routing_map, 3)
    made = dict(permutation._INDEX_CONSTANTS)
    assert made and not any(t.is_inference() for t in made.values())
    results = []
    for fresh in (False, True):
        if fresh:
            permutation._INDEX_CONSTANTS.clear()
        x = tokens.clone().requires_grad_()
        rows, row_probs, mapping = permute_tokens(x, probs, routing_map, 3)
        out = unpermute_tokens(rows * row_probs.unsqueeze(-1), mapping)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
        if not fresh:  # the constants made under inference_mode were used, not made again
            assert all(permutation._INDEX_CONSTANTS[k] is t for k, t in made.items())
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_gather_rows_moves_words_where_rows_tile_and_stays_bit_exact():
    """gather_rows is tokens[index] bit for bit: rows that tile into 8-byte words go as words (one eighth of the
    copies for e4m3 rows), others (odd widths, offset or strided views) as their own elements."""
    from megatron_esft.experts.permutation import _as_words, gather_rows

    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 40, (97,), generator=g)
    base = torch.randn(41, 64, generator=g) * 100
    cases = {
        "bf16": (base[:40].bfloat16(), True),
        "e4m3": (base[:40].clamp(-448, 448).to(torch.float8_e4m3fn), True),
        "fp32": (base[:40].clone(), True),
        "bf16, 3 columns": (base[:40, :3].bfloat16().contiguous(), False),
        "bf16, a view starting one element in": (base.bfloat16().flatten()[1:1 + 40 * 64].view(40, 64), False),
        "bf16, every other column": (base[:40].bfloat16()[:, ::2], False),
        "e4m3, 12 columns": (base[:40, :12].clamp(-448, 448).to(torch.float8_e4m3fn).contiguous(), False),
    }
    for name, (tokens, as_words) in cases.items():
        assert (_as_words(tokens) is not None) == as_words, name
        got = gather_rows(tokens, index)
        want = tokens.view(torch.uint8)[index] if tokens.element_size() == 1 else tokens[index]
        assert got.dtype == tokens.dtype and got.shape == (97, tokens.shape[1]), name
        assert torch.equal(got.view(torch.uint8) if tokens.element_size() == 1 else got, want), name
    assert gather_rows(cases["bf16"][0], index[:0]).shape == (0, 64)
