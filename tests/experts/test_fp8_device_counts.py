"""FP8 experts with their token counts on the device (experts/fp8_device_counts.py): one scaled grouped GEMM per
projection over all experts on e4m3 stacks gives the host-count FP8 path's outputs and gradients bit for bit with the
CPU's emulated FP8 GEMMs, reads no count on the host, keeps the frozen experts' quantization once (the weight cache's
entry is the stack's tail) and quantizes the trained experts' current values at every call."""

import pytest
import torch

from test_device_counts import NoHostCounts, _step, assert_cuda_device_counts_match_host_counts
from test_experts_permute import assert_equal_results, E, _experts, _routing

from megatron_esft.experts.fp8 import scaled_grouped_mm_supported


def _fp8_experts(trainable, policy="frozen"):
    experts = _experts(torch.bfloat16, trainable, backend="fp8")
    experts.set_gemm_backend("fp8", policy)
    return experts


def _assert_device_equals_host(experts, routing_map, probs, starve=()):
    """One step with host counts, one with device counts reading nothing on the host: the same results bit for bit.
    Returns the device step's."""
    experts.set_token_counts("host")
    want = _step(experts, routing_map, probs, torch.bfloat16)
    experts.set_token_counts("device")
    assert experts.counts_on_device()
    with NoHostCounts():
        got = _step(experts, routing_map, probs, torch.bfloat16)
    assert_equal_results(got, want, experts, experts.trainable_local_experts, starve)
    return got


@pytest.mark.parametrize("trainable, starve, policy", [([1, 6], (), "frozen"), ([6, 1, 3], (3, 5), "frozen"),
                                                       ([], (), "frozen"), (list(range(E)), (2,), "frozen"),
                                                       ([0, 1], (), "all")])
def test_fp8_device_counts_equal_host_counts_bitwise(mcore, trainable, starve, policy):
    experts = _fp8_experts(trainable, policy)
    routing_map, probs = _routing(7, starve=starve)
    got = _assert_device_equals_host(experts, routing_map, probs, starve)
    # FP8 is FP8: against bf16 experts on the same rows, the documented whole-MLP tolerance
    bf16 = _experts(torch.bfloat16, trainable)
    bf16.set_token_counts("device")
    ref = _step(bf16, routing_map, probs, torch.bfloat16)
    err = (got["out"].double() - ref["out"].double()).norm() / ref["out"].double().norm()
    assert 0 < err < 0.08


def test_frozen_quantization_is_kept_once_and_trained_values_are_current(mcore):
    experts = _fp8_experts([2, 5])
    experts.set_token_counts("device")
    cache, stacks = experts._fp8_cache, experts._fp8_stacks
    routing_map, probs = _routing(8)
    _step(experts, routing_map, probs, torch.bfloat16)
    # forward: both projections' "nk" stacks; backward: fc2's "kn" (dgrad) and fc1's "kn" (input gradient)
    assert set(stacks._stacks) == {(p, layout) for p in ("fc1", "fc2") for layout in ("nk", "kn")}
    assert cache.quantizations == 8  # 4 frozen (once) + 4 trained (this step)
    for (proj, layout), (q, s) in stacks._stacks.items():
        q_f, s_f = cache.get(getattr(experts, f"{proj}_frozen"), layout)
        assert q_f.data_ptr() == q[2:].data_ptr() and s_f.data_ptr() == s[2:].data_ptr()  # one copy: the tail
    assert cache.nbytes() * E == stacks.nbytes() * (E - 2)  # the cache holds the frozen tails only
    _step(experts, routing_map, probs, torch.bfloat16)
    assert cache.quantizations == 12  # the trained experts only, again
    # an in-place update of the trained experts (an optimizer step) reaches the next forward
    with torch.no_grad():
        experts.fc1_trainable.mul_(1.5)
        experts.fc2_trainable.add_(0.01)
    _assert_device_equals_host(experts, routing_map, probs)
    # a load into the frozen experts (a new version): quantized and copied into the stack again
    with torch.no_grad():
        experts.fc2_frozen.mul_(0.5)
    _assert_device_equals_host(experts, routing_map, probs)
    # a re-partition: new Parameters, new stacks
    experts.set_trainable_experts([0])
    _assert_device_equals_host(experts, routing_map, probs)
    assert stacks._stacks[("fc1", "nk")][0].shape[0] == E


def test_offloaded_frozen_weights_with_device_counts(mcore):
    """--offload-frozen-experts: the stacks take the frozen quantization made before the weights moved to host
    memory (no re-quantization from there) and give the resident experts' results."""
    resident = _fp8_experts([1, 6])
    offloaded = _fp8_experts([1, 6])
    offloaded.load_state_dict(resident.state_dict())
    offloaded.offload_frozen_weights()
    assert offloaded.frozen_weights_offloaded and offloaded.fc1_frozen.device.type == "cpu"
    routing_map, probs = _routing(9)
    for experts in (resident, offloaded):
        experts.set_token_counts("device")
        assert experts.counts_on_device()
    made = offloaded._fp8_cache.quantizations
    want = _step(resident, routing_map, probs, torch.bfloat16)
    with NoHostCounts():
        got = _step(offloaded, routing_map, probs, torch.bfloat16)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert offloaded._fp8_cache.quantizations == made + 4  # the trained experts' only


def test_fp8_without_a_weight_cache_keeps_host_counts(mcore):
    experts = _fp8_experts([1, 6], "none")
    experts.set_token_counts("device")
    assert not experts.counts_on_device()
    experts.set_gemm_backend("fp8", "frozen")
    assert experts.counts_on_device()


def test_memory_cost_is_the_trained_experts_quantizations(mcore):
    from megatron_esft.experts.spec import device_counts_copy_bytes

    experts = _fp8_experts([1, 6])
    experts.set_token_counts("device")
    trained = experts.fc1_trainable.numel() + experts.fc2_trainable.numel()
    assert device_counts_copy_bytes([experts]) == 2 * trained  # e4m3, two layouts
    routing_map, probs = _routing(3)
    _step(experts, routing_map, probs, torch.bfloat16)
    heads = sum(q[:2].numel() for q, _ in experts._fp8_stacks._stacks.values())
    assert heads == 2 * trained


@pytest.mark.skipif(not (torch.cuda.is_available() and scaled_grouped_mm_supported(torch.device("cuda"))),
                    reason="torch._scaled_grouped_mm needs an H100/B200-class GPU")
def test_cuda_fp8_device_counts_match_host_counts_without_host_syncs(mcore):
    """On the GPU: one scaled grouped GEMM per projection over all experts (device offsets, weight gradients whose
    offsets end before the last row) against the host counts' GEMMs per group: the same e4m3 operands, so results
    within bf16 rounding of each other (the kernels may tile differently); the second device step (the first
    compiles the quantizers and stacks the frozen experts) runs under torch's sync debug mode "error"."""
    assert_cuda_device_counts_match_host_counts(_fp8_experts([1, 6]).cuda())
