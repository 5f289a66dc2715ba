"""The grouped experts permuting the tokens themselves (experts/permutation.py "experts", grouped.py
`forward(..., routing_map=)`): the same numbers as the dispatcher's gather permutation followed by the experts' regroup
(bit for bit: the same rows reach the same GEMMs and each token's k rows are summed in the same order), with fewer
row copies; with FP8 experts the tokens are quantized before the gather (T rows, not T*k)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_esft.experts.permutation import (GatherPermutationAlltoAllDispatcher, permute_tokens,
                                               set_moe_permutation, topk_permutation, unpermute_tokens)
from tiny import batch, build_model, expert_grads, freeze_grouped, loss_of, tiny_config

E, K, H, FFN, T = 8, 2, 64, 48, 24  # H != FFN, 2 FFN: row tensors are told apart by width


class RowOps(TorchDispatchMode):
    """Shapes of the [rows, H] tensors gathered (index_select) and reduced per row (amax) while active. A gather is
    told by its rows' bytes (`row_bytes`, H elements of the data): gather_rows moves rows as 8-byte words."""

    def __init__(self, row_bytes):
        super().__init__()
        self.row_bytes = row_bytes
        self.gathered, self.amax_rows = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "index_select" and out.dim() == 2 and out.shape[1] * out.element_size() == self.row_bytes:
            self.gathered.append(out.shape[0])
        if name == "amax" and args[0].dim() == 2 and args[0].shape[1] == H:
            self.amax_rows.append(args[0].shape[0])
        return out


def _routing(seed, num_tokens=T, starve=()):
    """(routing map [T, E] with exactly K experts per token, router probabilities [T, E]); experts in `starve` get
    no tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, E, generator=g)
    logits[:, list(starve)] = -1e9
    top = logits.topk(K, dim=1).indices
    routing_map = torch.zeros(num_tokens, E, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.softmax(logits, dim=1) * routing_map
    return routing_map, probs


def test_topk_permutation_in_a_given_expert_order():
    routing_map, _ = _routing(0, num_tokens=37)
    order = torch.tensor([5, 1, 7, 0, 2, 3, 4, 6])
    token_of_row, expert_of_row, row_of_pair = topk_permutation(routing_map, K, order)
    rank = torch.empty(E, dtype=torch.long)
    rank[order] = torch.arange(E)
    keys = rank[expert_of_row] * 37 + token_of_row
    assert torch.all(keys[1:] > keys[:-1])  # rows by the requested expert order, then by token, each row once
    assert routing_map[token_of_row, expert_of_row].all() and len(token_of_row) == routing_map.sum()
    # pair t*K + j is still token t's j-th expert in ascending id: the un-permutation sums in the usual order
    experts_of_token = routing_map.nonzero()[:, 1].view(37, K)
    assert torch.equal(token_of_row[row_of_pair], torch.arange(37).repeat_interleave(K))
    assert torch.equal(expert_of_row[row_of_pair], experts_of_token.reshape(-1))


def _experts(dtype, trainable, backend="bf16"):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_esft.experts import FrozenAwareGroupedExperts

    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=FFN, use_cpu_initialization=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, gradient_accumulation_fusion=False, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(1)
    experts = FrozenAwareGroupedExperts(E, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                 linear_fc2=RowParallelLinear),
                                        get_default_pg_collection())
    experts.set_trainable_experts(trainable)
    if backend != "bf16":
        experts.set_gemm_backend(backend, "frozen")
    return experts


def _run(experts, routing_map, probs, dtype, ours: bool, seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(routing_map.shape[0], H, generator=g).to(dtype).requires_grad_()
    probs = probs.clone().requires_grad_()
    d_out = torch.randn(routing_map.shape[0], H, generator=g).to(dtype)
    for p in experts.parameters():
        p.grad = None
    tokens_per_expert = routing_map.sum(dim=0)
    with RowOps(H * tokens.element_size()) as seen:
        if ours:
            out, _ = experts(tokens, tokens_per_expert, probs, routing_map=routing_map)
        else:  # the dispatcher's gather permutation, then the experts' own regroup
            rows, permuted_probs, mapping = permute_tokens(tokens, probs, routing_map, K)
            out = unpermute_tokens(experts(rows, tokens_per_expert, permuted_probs)[0], mapping)
        out.backward(d_out)
    grads = {name: p.grad.clone() for name, p in experts.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "d_tokens": tokens.grad, "d_probs": probs.grad, **grads}, seen


def assert_equal_results(got: dict, want: dict, experts, trainable, starve=()):
    """The same outputs and gradients bit for bit (a gradient for each trainable group); a trainable expert without
    tokens gets an exact zero gradient (DDP's hooks still fire)."""
    assert got.keys() == want.keys() and len(got) == 3 + (2 if trainable else 0)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for j in starve:
        if j in trainable:
            group, row = experts.placement(j)
            assert torch.all(got[f"fc1_{group}"][row] == 0) and torch.all(got[f"fc2_{group}"][row] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable", [[1, 6], [0, 1, 2, 3, 4, 5, 6, 7], []])
def test_experts_permuting_tokens_equal_dispatcher_permutation_bitwise(mcore, dtype, trainable):
    experts = _experts(dtype, trainable)
    routing_map, probs = _routing(3)
    want, seen_ref = _run(experts, routing_map, probs, dtype, ours=False)
    got, seen = _run(experts, routing_map, probs, dtype, ours=True)
    assert got.keys() == want.keys() and len(got) == 3 + (2 if trainable else 0)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # one gather of the rows forward, one backward (the un-permutation's); the dispatcher path adds the regroup's
    rows = T * K
    assert seen.gathered.count(rows) == 2
    if 0 < len(trainable) < E:
        assert seen_ref.gathered.count(rows) == 6


@pytest.mark.parametrize("trainable, starve", [([1, 6], ()), ([1, 6], (1, 6)), ([], ()), (list(range(E)), (3,))])
def test_fp8_experts_quantize_tokens_before_the_gather(mcore, trainable, starve):
    """Emulated FP8 GEMMs on CPU: the same e4m3 values and scales as quantizing the permuted rows, so the same
    results bit for bit; the per-row amax runs over the T tokens and the T output-gradient rows, never T*k rows."""
    experts = _experts(torch.bfloat16, trainable, backend="fp8")
    routing_map, probs = _routing(5, starve=starve)
    want, seen_ref = _run(experts, routing_map, probs, torch.bfloat16, ours=False)
    got, seen = _run(experts, routing_map, probs, torch.bfloat16, ours=True)
    assert_equal_results(got, want, experts, trainable, starve)
    assert seen.amax_rows == [T, T] and sum(seen_ref.amax_rows) == 2 * T * K  # (the reference: per group)
    # the FP8 result is the FP8 result: against bf16 experts, the documented whole-MLP tolerance
    bf16, _ = _run(_experts(torch.bfloat16, trainable), routing_map, probs, torch.bfloat16, ours=True)
    err = (got["out"].double() - bf16["out"].double()).norm() / bf16["out"].double().norm()
    assert 0 < err < 0.08


def _saved_row_storages(experts, routing_map, probs, ours: bool) -> list:
    """Sizes in rows of H-wide storages the experts' forward saves for backward (deduplicated by storage)."""
    tokens = torch.randn(routing_map.shape[0], H).bfloat16().requires_grad_()
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.dim() == 2 and t.shape[1] == H and t.dtype == torch.bfloat16:
            seen[storage.data_ptr()] = storage.nbytes() // (H * t.element_size())
        return t

    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if ours:
            experts(tokens, routing_map.sum(dim=0), probs, routing_map=routing_map)
        else:  # rows from the dispatcher's gather permutation (regrouped by the experts)
            rows, permuted_probs, _ = permute_tokens(tokens, probs, routing_map, K)
            experts(rows, routing_map.sum(dim=0), permuted_probs)
    return [n for ptr, n in seen.items() if ptr not in params]


@pytest.mark.parametrize("backend", ["bf16", "fp8"])
@pytest.mark.parametrize("ours", [False, True])
def test_trainable_experts_save_only_their_rows(mcore, backend, ours):
    """A trainable expert's fc1 weight gradient needs its own input rows; a view into the layer's T*k rows would
    keep all of them alive until backward (the frozen experts save no input)."""
    experts = _experts(torch.bfloat16, [1, 6], backend=backend)
    routing_map, probs = _routing(4, num_tokens=64)
    trainable_rows = int(routing_map[:, [1, 6]].sum())
    saved = _saved_row_storages(experts, routing_map, probs, ours)
    assert 0 < trainable_rows < 64 * K and saved
    # FP8 from tokens saves the T tokens (quantized before the gather) instead of rows
    allowed = 64 if backend == "fp8" and ours else trainable_rows
    assert max(saved) <= allowed, saved
    experts.set_trainable_experts(list(range(E)))  # all trainable: one group, all rows, nothing to copy
    assert max(_saved_row_storages(experts, routing_map, probs, ours)) == (64 if backend == "fp8" and ours else 64 * K)


@pytest.mark.parametrize("backend", ["bf16", "fp8"])
@pytest.mark.parametrize("shared_overlap", [False, True])
def test_model_with_experts_permuting_equals_gather_permutation(mcore, backend, shared_overlap):
    from megatron_esft.experts import set_expert_gemm_backend

    dtype = torch.bfloat16 if backend == "fp8" else torch.float32
    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1], moe_shared_expert_overlap=shared_overlap,
                         params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    model = build_model(config, grouped=True, gather_permutation=True)
    freeze_grouped(model, {2: [1, 6], 3: [0, 5, 7]})
    if backend == "fp8":
        set_expert_gemm_backend([model], "fp8")
    dispatchers = [layer.mlp.token_dispatcher for layer in model.decoder.layers if hasattr(layer.mlp, "experts")]
    data = batch(seed=1)
    results = {}
    for permutation in ("gather", "experts"):
        assert set_moe_permutation(model, permutation) == 2
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, data)
        loss.backward()
        assert all(d.experts_permute == (permutation == "experts") for d in dispatchers)
        results[permutation] = (loss.detach(), expert_grads(model),
                                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(results["experts"][0], results["gather"][0])
    for i in (1, 2):
        assert results["experts"][i].keys() == results["gather"][i].keys()
        for key, grad in results["gather"][i].items():
            got = results["experts"][i][key]
            assert (got is None and grad is None) or torch.equal(got, grad), key
    assert all(isinstance(d, GatherPermutationAlltoAllDispatcher) for d in dispatchers)


def test_experts_that_cannot_permute_get_the_dispatchers_rows(mcore):
    """Megatron's SequentialMLP takes rows only: "experts" runs as "gather" (the same loss as asking for it)."""
    config = tiny_config(num_layers=2)
    torch.manual_seed(0)
    model = build_model(config, grouped=False, gather_permutation=True)
    dispatcher = model.decoder.layers[1].mlp.token_dispatcher
    data = batch(seed=3)
    losses = {}
    for permutation in ("experts", "gather"):
        set_moe_permutation(model, permutation)
        assert dispatcher.effective_permutation() == "gather"
        losses[permutation] = loss_of(model, data)
        assert not dispatcher.experts_permute
    assert torch.equal(losses["experts"], losses["gather"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real grouped and scaled grouped GEMM kernels")
@pytest.mark.parametrize("backend", ["bf16", "fp8"])
def test_cuda_experts_permuting_tokens_match_dispatcher_permutation(mcore, backend):
    """On the GPU: bf16 bit for bit as on CPU; FP8 through the compiled quantization kernels (compiled per row count,
    so quantizing T tokens or T*k rows may differ in the last bit of a scale): within 1e-2 relative (on an H100 with
    cc 9.0; the FP8 kernels need it)."""
    from megatron_esft.experts.fp8 import scaled_grouped_mm_supported

    if backend == "fp8" and not scaled_grouped_mm_supported(torch.device("cuda")):
        pytest.skip("no row-wise FP8 grouped GEMM kernel on this GPU")
    experts = _experts(torch.bfloat16, [1, 6], backend=backend).cuda()
    routing_map, probs = _routing(7, num_tokens=512)
    routing_map, probs = routing_map.cuda(), probs.cuda()
    results = {}
    for ours in (False, True):
        g = torch.Generator().manual_seed(8)
        tokens = torch.randn(512, H, generator=g).cuda().bfloat16().requires_grad_()
        p = probs.clone().requires_grad_()
        for param in experts.parameters():
            param.grad = None
        if ours:
            out, _ = experts(tokens, routing_map.sum(dim=0), p, routing_map=routing_map)
        else:
            rows, permuted_probs, mapping = permute_tokens(tokens, p, routing_map, K)
            out = unpermute_tokens(experts(rows, routing_map.sum(dim=0), permuted_probs)[0], mapping)
        out.backward(torch.randn(512, H, generator=g).cuda().bfloat16())
        results[ours] = [out.detach(), tokens.grad, p.grad] + [q.grad.clone() for q in experts.parameters()
                                                                 if q.grad is not None]
    for got, want in zip(results[True], results[False]):
        if backend == "bf16":
            assert torch.equal(got, want)
        else:
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronizations exist on CUDA only")
@pytest.mark.parametrize("backend", ["bf16", "fp8"])
@pytest.mark.parametrize("ours", [False, True])
def test_cuda_experts_run_without_host_syncs(mcore, backend, ours):
    """With the token counts on the host (where the dispatcher hands them over), the experts' forward and backward
    synchronize nothing: group offsets and index constants reach the GPU by non-blocking copies or are cached (a
    blocking host-to-device copy synchronizes the stream)."""
    from megatron_esft.experts.fp8 import scaled_grouped_mm_supported

    if backend == "fp8" and not scaled_grouped_mm_supported(torch.device("cuda")):
        pytest.skip("no row-wise FP8 grouped GEMM kernel on this GPU")
    experts = _experts(torch.bfloat16, [1, 6], backend=backend).cuda()
    routing_map, probs = _routing(9, num_tokens=256)
    routing_map, probs = routing_map.cuda(), probs.cuda()
    counts = routing_map.sum(dim=0).cpu()
    for checked in (False, True):  # the first step compiles kernels and probes the grouped GEMM
        tokens = torch.randn(256, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            if ours:
                out, _ = experts(tokens, counts, probs, routing_map=routing_map)
            else:
                rows, permuted_probs, mapping = permute_tokens(tokens, probs, routing_map, K)
                out = unpermute_tokens(experts(rows, counts, permuted_probs)[0], mapping)
            out.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tokens.grad is not None and experts.fc1_trainable.grad is not None
