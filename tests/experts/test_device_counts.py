"""Token counts on the device (experts/device_counts.py): the grouped experts without a host sync give the host-count
path's outputs and gradients bit for bit on the CPU, read no count on the host, keep the frozen experts' weights
without a copy, and need no T*k-row tensor for backward; in a model, Megatron's dispatcher then skips its
device-to-host copy."""

import contextlib

import pytest
import torch

from megatron_esft.experts.permutation import set_moe_permutation
from test_experts_permute import assert_equal_results, E, FFN, H, K, _experts, _routing, _run
from test_permutation import OpNames
from tiny import batch, build_model, freeze_grouped, loss_of, tiny_config


class NoHostCounts:
    """Fails any host read of a tensor's values (`.tolist()`, `.item()`, `int()`) while active: what needs a device
    sync on a GPU."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__int__", "__index__")}

        def refuse(self_, *args, **kwargs):
            raise AssertionError("a tensor's values were read on the host")

        for name in self.saved:
            setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def _step(experts, routing_map, probs, dtype):
    """Outputs and gradients of one forward/backward from tokens (test_experts_permute's, experts permuting)."""
    return _run(experts, routing_map, probs, dtype, ours=True)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable, starve", [([1, 6], ()), ([6, 1, 3], (3, 5)), ([], ()), (list(range(E)), (2,)),
                                               ([0, 1], ())])
def test_device_counts_equal_host_counts_bitwise(mcore, dtype, trainable, starve):
    experts = _experts(dtype, trainable)
    routing_map, probs = _routing(7, starve=starve)
    want = _step(experts, routing_map, probs, dtype)
    experts.set_token_counts("device")
    assert experts.counts_on_device()
    with NoHostCounts():
        got = _step(experts, routing_map, probs, dtype)
    assert_equal_results(got, want, experts, trainable, starve)


def test_frozen_weights_are_a_view_of_the_stack_and_trained_values_are_current(mcore):
    experts = _experts(torch.float32, [2, 5])
    experts.set_token_counts("device")
    routing_map, probs = _routing(8)
    frozen_before = experts.fc1_frozen.detach().clone()
    _step(experts, routing_map, probs, torch.float32)
    stack = experts._stacks._stacks["fc1"]
    # no copy of the frozen experts: their Parameter is the stack's tail, same values
    assert experts.fc1_frozen.data_ptr() == stack[2:].data_ptr() and torch.equal(experts.fc1_frozen, frozen_before)
    # an update of the trainable Parameters (as an optimizer's in-place step) reaches the next forward
    with torch.no_grad():
        experts.fc1_trainable.mul_(1.5)
        experts.fc2_trainable.add_(0.01)
    _assert_modes_agree(experts, routing_map, probs)
    # a re-partition replaces the Parameters, a `.to()` their data: the stack follows
    experts.set_trainable_experts([0])
    _assert_modes_agree(experts, routing_map, probs)
    assert experts.fc1_frozen.data_ptr() == experts._stacks._stacks["fc1"][1:].data_ptr()
    experts.to(torch.bfloat16)
    _assert_modes_agree(experts, routing_map, probs, torch.bfloat16)
    assert experts._stacks._stacks["fc1"].dtype == torch.bfloat16
    assert experts.fc1_frozen.data_ptr() == experts._stacks._stacks["fc1"][1:].data_ptr()


def _assert_modes_agree(experts, routing_map, probs, dtype=torch.float32):
    experts.set_token_counts("host")
    want = _step(experts, routing_map, probs, dtype)
    experts.set_token_counts("device")
    got = _step(experts, routing_map, probs, dtype)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_memory_cost_is_one_copy_of_the_trained_experts(mcore):
    from megatron_esft.experts.spec import device_counts_copy_bytes

    experts = _experts(torch.float32, [1, 6])
    assert device_counts_copy_bytes([experts]) == 0  # host counts: nothing
    experts.set_token_counts("device")
    per_expert = (2 * FFN * H + H * FFN) * 4  # fc1 [2F, H] + fc2 [H, F], fp32
    assert device_counts_copy_bytes([experts]) == 2 * per_expert
    routing_map, probs = _routing(3)
    _step(experts, routing_map, probs, torch.float32)
    stacks = experts._stacks._stacks
    assert sum(t.numel() * t.element_size() for t in stacks.values()) == E * per_expert  # frozen part: no copy


def test_no_rows_kept_for_backward(mcore):
    """Nothing T*k rows long is saved: the tokens are, and the trained rows are gathered again in backward."""
    experts = _experts(torch.bfloat16, [1, 6])
    experts.set_token_counts("device")
    routing_map, probs = _routing(4, num_tokens=64)
    saved = []

    def pack(t):
        if t.dim() == 2 and t.shape[1] == H:
            saved.append(t.shape[0])
        return t

    tokens = torch.randn(64, H).bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts(tokens, routing_map.sum(dim=0), probs, routing_map=routing_map)
    assert saved == [64]


def test_steady_state_step_makes_no_index_constants(mcore):
    """On a GPU every op of a MoE layer is host time (dispatch and a launch, whatever its size): after the first
    step the device path makes no index constants (the permutation's aranges are cached, experts/permutation.
    index_range) and finds the group offsets without a cumulative sum of the counts, and a step runs fewer ops than
    with the host counts."""
    experts = _experts(torch.bfloat16, [1, 6])
    routing_map, probs = _routing(7)
    ops = {}
    for mode in ("host", "device"):
        experts.set_token_counts(mode)
        _step(experts, routing_map, probs, torch.bfloat16)  # the first step may make the constants
        with OpNames() as seen:
            _step(experts, routing_map, probs, torch.bfloat16)
        ops[mode] = seen.counts
    assert not {"arange", "cumsum", "floor_divide"} & set(ops["device"]), ops["device"]
    assert sum(ops["device"].values()) < sum(ops["host"].values()), ops


def test_falls_back_to_host_counts_where_it_must(mcore):
    experts = _experts(torch.bfloat16, [1, 6], backend="fp8")
    experts.set_token_counts("device")
    assert experts.counts_on_device()  # FP8 experts with a weight cache (test_fp8_device_counts.py)
    experts.set_gemm_backend("fp8", "none")
    assert not experts.counts_on_device()
    experts.set_gemm_backend("bf16")
    assert experts.counts_on_device()
    experts.config.moe_apply_probs_on_input = True
    assert not experts.counts_on_device()
    experts.config.moe_apply_probs_on_input = False
    with pytest.raises(ValueError, match="token counts mode"):
        experts.set_token_counts("gpu")


RECOMPUTE = {"none": {}, "moe": dict(recompute_granularity="selective", recompute_modules=["moe"])}


@pytest.mark.parametrize("shared_overlap, recompute, backend", [
    (False, "none", "bf16"), (True, "none", "bf16"), (False, "moe", "bf16"), (False, "none", "fp8"),
    (True, "moe", "fp8")])
def test_model_with_device_counts_equals_host_counts(mcore, shared_overlap, recompute, backend):
    """A tiny MoE GPT (dense layer, two MoE layers with shared experts; also with the MoE blocks recomputed in
    backward, which runs the experts' forward again; also bf16 with FP8 experts): the same loss and gradients bit
    for bit; the dispatcher skips its copy of the counts to the host and the experts get the device tensor."""
    from megatron_esft.experts import set_expert_gemm_backend, set_expert_token_counts

    dtype = torch.bfloat16 if backend == "fp8" else torch.float32
    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1], moe_shared_expert_overlap=shared_overlap,
                         params_dtype=dtype, bf16=dtype == torch.bfloat16, **RECOMPUTE[recompute])
    torch.manual_seed(0)
    model = build_model(config, grouped=True, gather_permutation=True)
    freeze_grouped(model, {2: [1, 6], 3: [0, 5, 7]})
    if backend == "fp8":
        set_expert_gemm_backend([model], "fp8")
    assert set_moe_permutation(model, "experts") == 2
    data = batch(seed=1)
    results = {}
    for mode in ("host", "device"):
        assert set_expert_token_counts([model], mode) == 2
        model.zero_grad(set_to_none=True)
        dtoh = []
        for layer in model.decoder.layers[1:]:
            dispatcher = layer.mlp.token_dispatcher
            original = dispatcher._maybe_dtoh_and_synchronize
            # the calls that act: the copy to the host at its point, the wait at the sync point (Megatron's
            # token_dispatch also calls it "before_ep_alltoall", a point that does nothing at EP = 1)
            dispatcher._maybe_dtoh_and_synchronize = (
                lambda point, t=None, original=original, d=dispatcher: (
                    point in (d.cuda_dtoh_point, d.cuda_sync_point) and dtoh.append(point)) or original(point, t))
        # the MoE layers' forward and the whole backward read nothing on the host (the attention's forward does:
        # Megatron's CPU RNG tracker)
        guard = NoHostCounts()
        hooks = [h for layer in model.decoder.layers[1:] for h in (
            layer.mlp.register_forward_pre_hook(lambda *_: guard.__enter__() and None),
            layer.mlp.register_forward_hook(lambda *_: guard.__exit__() and None))] if mode == "device" else []
        try:
            loss = loss_of(model, data)
            with NoHostCounts() if mode == "device" else contextlib.nullcontext():
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
            for layer in model.decoder.layers[1:]:
                del layer.mlp.token_dispatcher._maybe_dtoh_and_synchronize
        assert bool(dtoh) == (mode == "host")
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_h, grads_h), (loss_d, grads_d) = results["host"], results["device"]
    assert torch.equal(loss_h, loss_d) and grads_h.keys() == grads_d.keys()
    for name in grads_h:
        assert torch.equal(grads_h[name], grads_d[name]), name


def assert_cuda_device_counts_match_host_counts(experts):
    """Host counts, then device counts twice (the second under torch's sync debug mode "error": the first may compile
    kernels and build caches): the device results within bf16's 1e-2 of the host ones (the GPU kernels may tile one
    GEMM over all experts differently from one per group)."""
    routing_map, probs = _routing(7, num_tokens=512)
    routing_map, probs = routing_map.cuda(), probs.cuda()
    results = {}
    for mode in ("host", "device", "device"):
        experts.set_token_counts(mode)
        g = torch.Generator().manual_seed(8)
        tokens = torch.randn(512, H, generator=g).cuda().bfloat16().requires_grad_()
        p = probs.clone().requires_grad_()
        for param in experts.parameters():
            param.grad = None
        counts = routing_map.sum(dim=0)
        # made before the checked region: a copy from pageable host memory is itself a synchronizing operation (the
        # first H200 run of this test failed on exactly that copy, not on the experts)
        grad_out = torch.randn(512, H, generator=g).cuda().bfloat16()
        torch.cuda.set_sync_debug_mode("error" if mode in results else "default")
        try:
            out, _ = experts(tokens, counts if mode == "device" else counts.cpu(), p, routing_map=routing_map)
            out.backward(grad_out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[mode] = [out.detach(), tokens.grad, p.grad] + [q.grad.clone() for q in experts.parameters()
                                                                 if q.grad is not None]
    assert len(results["device"]) == 5
    for got, want in zip(results["device"], results["host"]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real grouped GEMM kernels and host syncs: CUDA only")
def test_cuda_device_counts_match_host_counts_without_host_syncs(mcore):
    """On the GPU: the CUTLASS grouped GEMMs with device offsets (the weight gradients' offsets end before the last
    row) give the host-count path's results within bf16's 1e-2; the experts' forward and backward and a whole MoE
    layer's forward and backward (router, dispatcher, shared experts) run under torch's sync debug mode "error"."""
    experts = _experts(torch.bfloat16, [1, 6]).cuda()
    assert_cuda_device_counts_match_host_counts(experts)

    from megatron_esft.experts import set_expert_token_counts

    config = tiny_config(num_layers=2, moe_layer_freq=[0, 1], params_dtype=torch.bfloat16, bf16=True)
    torch.manual_seed(0)
    model = build_model(config, grouped=True, gather_permutation=True).cuda()
    freeze_grouped(model, {2: [1, 6]})
    set_expert_token_counts([model], "device")
    moe = model.decoder.layers[1].mlp
    hidden = torch.randn(16, 2, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for checked in (False, True):
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            out, _ = moe(hidden)
            out.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert moe.experts.fc1_trainable.grad is not None


def test_experts_with_host_counts_names_the_modules_a_graph_cannot_capture(mcore):
    """The whole-iteration CUDA graph refuses to start with any of these (training/loop.py): every MoE layer's experts
    in the host mode, none in the device mode, and again all with FP8 experts that have no weight cache."""
    from megatron_esft.experts import set_expert_gemm_backend, set_expert_token_counts
    from megatron_esft.experts.spec import experts_with_host_counts

    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1], params_dtype=torch.bfloat16, bf16=True)
    model = build_model(config, grouped=True, gather_permutation=True)
    set_moe_permutation(model, "experts")
    names = ["decoder.layers.1.mlp.experts", "decoder.layers.2.mlp.experts"]
    assert experts_with_host_counts([model]) == names
    set_expert_token_counts([model], "device")
    assert experts_with_host_counts(model) == []
    set_expert_gemm_backend([model], "fp8", "frozen")
    assert experts_with_host_counts([model]) == []
    set_expert_gemm_backend([model], "fp8", "none")
    assert experts_with_host_counts([model]) == names
