"""bf16 on CPU, the per-expert loop fallback for unaligned shapes, and the spec swap."""

import pytest
import torch
from tiny import batch, build_model, copy_sequential_to_grouped, freeze_grouped, freeze_sequential, loss_of, tiny_config

from megatron_esft.experts.grouped_mm import (cuda_capability, empty_groups_get_unwritten_wgrad, grouped_mm_supported,
                                              grouped_mm_takes_device_offsets)


def test_grouped_mm_support_probe():
    cpu = torch.device("cpu")
    assert grouped_mm_supported(torch.float32, cpu, 32, 32)
    assert grouped_mm_supported(torch.bfloat16, cpu, 32, 16)
    assert not grouped_mm_supported(torch.bfloat16, cpu, 32, 12)  # 24-byte rows: not 16-byte aligned
    assert not grouped_mm_supported(torch.float64, cpu, 32, 32)


def test_grouped_mm_takes_device_offsets_only_where_torch_has_the_kernel(monkeypatch):
    """torch._grouped_mm's own CUDA kernel (offsets read on the device) is bf16 on compute capability 9.x / 10.x;
    elsewhere on a GPU its fallback copies the offsets to the host, so the token counts may as well be there."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert grouped_mm_takes_device_offsets(dtype, torch.device("cpu"))
    for capability, dtype, expected in [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True),
                                        ((9, 0), torch.float32, False), ((9, 0), torch.float16, False),
                                        ((8, 0), torch.bfloat16, False), ((12, 0), torch.bfloat16, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert grouped_mm_takes_device_offsets(dtype, torch.device("cuda", 0)) is expected, (capability, dtype)


def test_cuda_capability_is_looked_up_once_per_device(monkeypatch):
    """The experts ask on every MoE layer's forward and backward; the lookup (torch's lazy init and device
    properties) runs once per device, and a patched lookup is asked itself, not answered from the cache."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (10, 0))
    for _ in range(3):
        assert grouped_mm_takes_device_offsets(torch.bfloat16, torch.device("cuda", 0))
        assert empty_groups_get_unwritten_wgrad(torch.device("cuda", 0))
    assert cuda_capability(torch.device("cuda", 1)) == (10, 0)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not empty_groups_get_unwritten_wgrad(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode: GPU only")
def test_cuda_grouped_mm_syncs_exactly_where_the_offsets_are_not_read_on_the_device():
    device = torch.device("cuda")
    offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(32, 64, dtype=dtype, device=device)
        w = torch.randn(2, 32, 64, dtype=dtype, device=device).transpose(-2, -1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch._grouped_mm(x, w, offs=offs)
            synced = False
        except RuntimeError as exc:
            synced = "synchroniz" in str(exc)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert synced is not grouped_mm_takes_device_offsets(dtype, device), dtype


def _compare(config, trainable, atol):
    torch.manual_seed(0)
    ref, ours = build_model(config, grouped=False), build_model(config, grouped=True)
    copy_sequential_to_grouped(ref, ours)
    freeze_sequential(ref, trainable)
    freeze_grouped(ours, trainable)
    data = batch(seed=2)
    loss_ref, loss_ours = loss_of(ref, data), loss_of(ours, data)
    loss_ref.backward()
    loss_ours.backward()
    assert torch.isfinite(loss_ours)
    assert abs(loss_ref.item() - loss_ours.item()) <= atol
    experts_ref, experts_ours = ref.decoder.layers[1].mlp.experts, ours.decoder.layers[1].mlp.experts
    for j in trainable[2]:
        group, row = experts_ours.placement(j)
        for proj in ("fc1", "fc2"):
            g_ref = getattr(experts_ref.local_experts[j], f"linear_{proj}").weight.grad.float()
            g_ours = getattr(experts_ours, f"{proj}_{group}").grad[row].float()
            assert torch.isfinite(g_ours).all()
            torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=atol * max(1.0, g_ref.abs().max().item()))


def test_fallback_loop_for_unaligned_shapes_matches_sequential(mcore):
    # moe_ffn_hidden_size 6 -> fp32 rows of 24 bytes: torch._grouped_mm cannot run, the F.linear loop takes over
    assert not grouped_mm_supported(torch.float32, torch.device("cpu"), 6, 32)
    _compare(tiny_config(moe_ffn_hidden_size=6), {2: [0, 3, 4]}, atol=1e-6)


def test_bf16_forward_backward_smoke(mcore):
    config = tiny_config(params_dtype=torch.bfloat16, bf16=True)
    _compare(config, {2: [2, 7, 5]}, atol=5e-2)


def test_use_grouped_experts_swaps_only_moe_layers():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_esft.experts import FrozenAwareGroupedExperts, use_grouped_experts

    spec = get_gpt_decoder_block_spec(tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1]), use_transformer_engine=False)
    swapped = use_grouped_experts(spec)
    kinds = [getattr(s.submodules.mlp.submodules, "experts", None) for s in swapped.layer_specs]
    assert kinds[0] is None
    assert all(k.module is FrozenAwareGroupedExperts for k in kinds[1:])
    assert spec.layer_specs[1].submodules.mlp.submodules.experts.module is SequentialMLP  # input spec untouched
    with pytest.raises(ValueError):
        use_grouped_experts(spec.layer_specs[0])
