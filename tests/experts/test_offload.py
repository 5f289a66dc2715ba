"""Frozen experts' weights in host memory (FrozenAwareGroupedExperts.offload_frozen_weights): with FP8 experts and a
weight cache the device keeps only the e4m3 copies of frozen experts. Training must be bit-identical to keeping them
on the device, checkpoints must read and write the host copies, a changed host weight must be re-quantized, and every
path that would read a host weight directly is refused. On CPU host and device memory are the same, so what is
checked here is the bookkeeping and the numerics; the GPU-only test checks the memory actually freed."""

import pytest
import torch
import torch.nn.functional as F
from tiny import batch, build_model, freeze_grouped, loss_of, moe_experts, tiny_config

from megatron_esft.experts import offload_frozen_expert_weights, set_expert_gemm_backend

TRAINABLE = {2: [1, 6]}
# the three FP8 paths that read frozen weights: fused SwiGLU on the dispatcher's rows, fused SwiGLU on the tokens
# (the experts permute them), and plain FP8 grouped GEMMs around an unfused activation (non-SwiGLU experts)
PATHS = {
    "swiglu rows": (dict(), False),
    "swiglu tokens": (dict(), True),
    "gelu rows": (dict(gated_linear_unit=False, activation_func=F.gelu), False),
}


def _models(path, count=2, device="cpu", hidden=32, ffn=16):
    overrides, tokens = PATHS[path]
    config = tiny_config(params_dtype=torch.bfloat16, bf16=True, moe_ffn_hidden_size=ffn, hidden_size=hidden,
                         use_cpu_initialization=True, **overrides)
    torch.manual_seed(0)
    first = build_model(config, grouped=True, gather_permutation=tokens)
    models = [first] + [build_model(config, grouped=True, gather_permutation=tokens) for _ in range(count - 1)]
    for model in models:
        model.load_state_dict(first.state_dict())
        model.to(device)
        freeze_grouped(model, TRAINABLE)
        set_expert_gemm_backend([model], "fp8", "frozen")
    return models


def _frozen_weights(model):
    return [getattr(experts, f"{proj}_frozen") for _, experts in moe_experts(model) for proj in ("fc1", "fc2")]


def _train(model, steps=3, device="cpu"):
    """(losses, trainable gradients of each step): plain SGD on the trainable parameters."""
    losses, grads = [], []
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        tokens, positions, labels = (t.to(device) for t in batch(seed=10 + step))
        loss = loss_of(model, (tokens, positions, labels))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
                p.grad = None
    return losses, grads


@pytest.mark.parametrize("path", list(PATHS))
def test_offloaded_frozen_experts_train_bit_identically(mcore, path):
    resident, offloaded = _models(path)
    before = [w.detach().clone() for w in _frozen_weights(offloaded)]
    moved, cached = offload_frozen_expert_weights([offloaded])
    (_, experts), = moe_experts(offloaded)
    assert experts.frozen_weights_offloaded
    assert moved == sum(w.numel() * 2 for w in before) > 0
    assert cached == experts._fp8_cache.nbytes() > 0  # both e4m3 layouts of both frozen projections, made up front
    assert experts._fp8_cache.quantizations == 4
    assert all(w.device.type == "cpu" for w in _frozen_weights(offloaded))

    losses, grads = _train(resident)
    losses_off, grads_off = _train(offloaded)
    for want, got in zip(losses, losses_off):
        assert torch.equal(want, got)
    for want, got in zip(grads, grads_off):
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    # the frozen weights stayed bit-identical; their quantizations were made once (resident: on first use)
    assert all(torch.equal(a, b) for a, b in zip(before, _frozen_weights(offloaded)))
    (_, resident_experts), = moe_experts(resident)
    assert experts._fp8_cache.quantizations == resident_experts._fp8_cache.quantizations


def test_checkpoints_read_and_write_the_host_copies(mcore, tmp_path):
    """dist_checkpointing saves the host weights; loading new values into host weights makes the cache re-quantize
    them (their version changed), so the offloaded model computes with the loaded values."""
    from megatron.core import dist_checkpointing

    saved, offloaded, reference = _models("swiglu rows", count=3)
    with torch.no_grad():  # give the model to be saved other expert weights than the other two
        for w in _frozen_weights(saved):
            w.mul_(-1.5)
    offload_frozen_expert_weights([saved])
    offload_frozen_expert_weights([offloaded])
    data = batch(seed=3)
    loss_before = loss_of(offloaded, data)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path / "ckpt"))
    for model in (offloaded, reference):
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path / "ckpt"))
        missing, unexpected = model.load_state_dict(loaded, strict=True)
        assert not missing and not unexpected
    for a, b in zip(_frozen_weights(saved), _frozen_weights(offloaded)):
        assert a.device.type == "cpu" and torch.equal(a, b)
    (_, experts), = moe_experts(offloaded)
    count = experts._fp8_cache.quantizations
    loss_after = loss_of(offloaded, data)
    # the forward layouts of both frozen projections re-made, besides the two trainable ones every forward makes
    assert experts._fp8_cache.quantizations == count + 2 + 2
    count = experts._fp8_cache.quantizations
    loss_of(offloaded, data)
    assert experts._fp8_cache.quantizations == count + 2  # and kept again
    assert not torch.equal(loss_after, loss_before)
    assert torch.equal(loss_after, loss_of(reference, data))  # the never-offloaded model loaded the same way


def test_offload_is_refused_where_host_weights_would_be_read(mcore):
    model, = _models("swiglu rows", count=1)
    (_, experts), = moe_experts(model)
    set_expert_gemm_backend([model], "bf16")
    with pytest.raises(ValueError, match="needs the fp8 backend with a weight cache"):
        offload_frozen_expert_weights([model])
    set_expert_gemm_backend([model], "fp8", "none")
    with pytest.raises(ValueError, match="needs the fp8 backend with a weight cache"):
        offload_frozen_expert_weights([model])
    set_expert_gemm_backend([model], "fp8", "frozen")
    offload_frozen_expert_weights([model])
    assert offload_frozen_expert_weights([model])[0] == 0  # already offloaded: nothing moves twice
    with pytest.raises(ValueError, match="in host memory"):
        experts.set_gemm_backend("bf16")
    with pytest.raises(ValueError, match="in host memory"):
        experts.set_gemm_backend("fp8", "none")
    with pytest.raises(ValueError, match="in host memory"):
        experts.set_trainable_experts([0])
    # a fresh cache (set again): the next step quantizes from the host weights
    experts.set_gemm_backend("fp8", "all")
    loss_of(model, batch(seed=1)).backward()
    assert experts._fp8_cache.quantizations > 0
    # back on the device, everything is allowed again and the bf16 backend computes what a never-offloaded model does
    assert experts.reload_frozen_weights() > 0 and not experts.frozen_weights_offloaded
    experts.set_gemm_backend("bf16")
    experts.set_trainable_experts([0])
    reference, = _models("swiglu rows", count=1)
    freeze_grouped(reference, {2: [0]})
    set_expert_gemm_backend([reference], "bf16")
    with torch.no_grad():
        for p in model.parameters():
            p.grad = None
    assert torch.equal(loss_of(model, batch(seed=2)), loss_of(reference, batch(seed=2)))


def test_a_model_without_frozen_experts_moves_nothing(mcore):
    model, = _models("swiglu rows", count=1)
    freeze_grouped(model, {2: list(range(8))})
    set_expert_gemm_backend([model], "fp8", "frozen")
    assert offload_frozen_expert_weights([model]) == (0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host and device memory differ only with a GPU")
@pytest.mark.parametrize("path", ["swiglu rows", "swiglu tokens"])
def test_cuda_offload_frees_device_memory_and_trains_bit_identically(mcore, path):
    from megatron_esft.experts.fp8 import scaled_grouped_mm_supported

    if not scaled_grouped_mm_supported(torch.device("cuda")):
        pytest.skip("no row-wise FP8 grouped GEMM kernel on this GPU")
    # experts large enough (6 frozen x 1.5M parameters) for allocator rounding not to matter
    resident, offloaded, first = _models(path, count=3, device="cuda", hidden=1024, ffn=512)
    # offload a third model first: the first offload in a process allocated 1 MiB more that stays (seen on an H200:
    # the first parametrization measured exactly 1 MiB more than the second), which is not the offload's to free
    offload_frozen_expert_weights([first])
    (_, experts), = moe_experts(offloaded)
    torch.cuda.synchronize()
    allocated, cached_before = torch.cuda.memory_allocated(), experts._fp8_cache.nbytes()
    moved, cached = offload_frozen_expert_weights([offloaded])
    torch.cuda.synchronize()
    # the bf16 weights left the device, their e4m3 copies (and scales) arrived, the quantizations' temporaries are gone
    change = torch.cuda.memory_allocated() - allocated
    assert moved == 6 * 3 * 1024 * 512 * 2 and cached > moved
    assert abs(change - (cached - cached_before - moved)) < 2**20, (change, cached, moved)
    assert all(w.device.type == "cpu" and w.is_pinned() for w in _frozen_weights(offloaded))
    losses, grads = _train(resident, device="cuda")
    losses_off, grads_off = _train(offloaded, device="cuda")
    # messages with the numbers: on a cold H200 (2026-12-01) one run of this test failed, and its log was lost
    assert all(torch.equal(a, b) for a, b in zip(losses, losses_off)), (losses, losses_off)
    for step, (want, got) in enumerate(zip(grads, grads_off)):
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), (step, i, (a.float() - b.float()).abs().max().item())
