"""Trained experts without tokens get exact zero weight gradients on every grouped-GEMM path, also where the kernel
does not guarantee it (Blackwell, pytorch/pytorch#172439: experts/grouped_mm.zero_empty_groups). The CPU's kernel
gives zeros, so the masking is checked on a gradient with garbage in its empty groups, and each path is run with the
masking switched on: it must consult it and give the same results bit for bit."""

import pytest
import torch

from megatron_esft.experts import grouped_mm
from test_device_counts import _step
from test_experts_permute import assert_equal_results, _experts, _routing


@pytest.fixture
def masking_on(monkeypatch):
    """The masking switched on as on a Blackwell GPU; counts how often the gradient paths ask for it."""
    asked = []
    monkeypatch.setattr(grouped_mm, "empty_groups_get_unwritten_wgrad", lambda device: asked.append(device) or True)
    return asked


def test_zero_empty_groups_masks_exactly_the_groups_without_rows(masking_on):
    offs = torch.tensor([2, 2, 5, 5, 9], dtype=torch.int32)  # groups 1 and 3 have no rows
    grad = torch.randn(5, 3, 4)
    grad[1] = float("nan")
    grad[3] = 1e30
    masked = grouped_mm.zero_empty_groups(grad, offs)
    assert torch.equal(masked[[0, 2, 4]], grad[[0, 2, 4]])
    assert torch.equal(masked[[1, 3]], torch.zeros(2, 3, 4))


def test_cpu_and_hopper_gradients_pass_unchanged():
    grad, offs = torch.randn(3, 2, 2), torch.tensor([0, 4, 4], dtype=torch.int32)
    assert grouped_mm.zero_empty_groups(grad, offs) is grad
    assert not grouped_mm.empty_groups_get_unwritten_wgrad(torch.device("cpu"))


@pytest.mark.parametrize("backend, counts", [("bf16", "host"), ("bf16", "device"), ("fp8", "host"),
                                             ("fp8", "device")])
def test_every_weight_gradient_path_masks_empty_groups(mcore, backend, counts, request):
    """Trained experts 3 and 5 starve: with the masking on, each path asks for it and its results are unchanged
    (outputs, input and probability gradients, trained experts' gradients with exact zeros for the starved ones)."""
    trainable, starve = [6, 1, 3, 5], (3, 5)
    experts = _experts(torch.bfloat16, trainable, backend=backend)
    if backend == "fp8":
        experts.set_gemm_backend("fp8", "frozen")
    experts.set_token_counts(counts)
    routing_map, probs = _routing(7, starve=starve)
    want = _step(experts, routing_map, probs, torch.bfloat16)
    asked = request.getfixturevalue("masking_on")
    got = _step(experts, routing_map, probs, torch.bfloat16)
    assert asked, "the weight gradients did not go through zero_empty_groups"
    assert_equal_results(got, want, experts, trainable, starve)


def test_fp8_grouped_mm_masks_empty_groups(masking_on):
    from megatron_esft.experts.fp8 import FP8WeightCache, fp8_grouped_mm

    x = torch.randn(7, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)
    fp8_grouped_mm(x, w, offs, FP8WeightCache("none")).sum().backward()
    assert masking_on and torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
