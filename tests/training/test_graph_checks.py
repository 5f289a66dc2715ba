"""training/graph_checks.py: the CPU's checks of what a CUDA graph of the training iteration relies on. HostSyncs
counts host reads; OpTrace + first_difference find what a replay of a captured iteration would get wrong (a Python
number or literal that changes per step, a tensor from before the iteration at another address, data-dependent
work), on a tiny ESFT DeepSeek-V2 as the trainer builds it and on hand-made iterations."""

from __future__ import annotations

import pytest
import torch

from megatron_esft.training.graph_checks import HostSyncs, OpTrace, first_difference


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _tiny_moe(permutation: str, token_counts: str, expert_gemm: str = "bf16"):
    """(model, iteration(seed)): forward + backward of a tiny ESFT DeepSeek-V2 as the trainer builds it
    (models/provider.py: our layer spec; bf16 with FP8 experts) on a static token buffer refilled with the seed's
    tokens."""
    from megatron_esft.esft import freeze
    from megatron_esft.esft.expert_config import ExpertConfig
    from megatron_esft.esft.hang_guard import install_hang_guard
    from megatron_esft.experts import set_expert_token_counts
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                  vocab=64)))
    torch.manual_seed(0)
    model = build_model(cfg, experts="grouped", moe_permutation=permutation,
                        params_dtype=torch.bfloat16 if expert_gemm == "fp8" else torch.float32)
    ecfg = ExpertConfig({"1": [0, 2], "2": [5]})
    freeze.apply_finetune_mode(model, "esft", ecfg)
    if expert_gemm == "fp8":
        from megatron_esft.experts import set_expert_gemm_backend

        set_expert_gemm_backend(model, "fp8", "frozen")
    set_expert_token_counts(model, token_counts)
    install_hang_guard(model, freeze.first_trainable_layer_number(ecfg, "esft", ["1", "2"]))
    tokens, positions = torch.zeros(2, 32, dtype=torch.long), torch.arange(32).expand(2, 32)

    def iteration(seed: int = 0):
        tokens.copy_(torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed)))
        model.zero_grad(set_to_none=True)  # (the trainer: DDP's buffers, zeroed in place before the iteration)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        return loss.detach()

    return model, iteration


def _traces(iteration, *args) -> list[OpTrace]:
    traces = []
    for arg in args:
        with OpTrace() as trace:
            iteration(arg)
        traces.append(trace)
    return traces


def test_host_sync_check_finds_what_a_capture_cannot_hold(mcore):
    """Megatron's own permutation reads its row counts on the host (masked_select), the grouped experts with host
    token counts read them with .tolist(); with their token counts on the device they read nothing in forward or
    backward, nor does the rest of the model."""
    with HostSyncs() as syncs:
        _tiny_moe("megatron", "host")[1]()
    assert "masked_select" in syncs.found, syncs.found
    with HostSyncs() as syncs:  # the grouped experts split their rows by the counts, read with .tolist()
        _tiny_moe("experts", "host")[1]()
    assert syncs.found["tolist"] >= 2, syncs.found
    with HostSyncs() as syncs:
        _tiny_moe("experts", "device")[1]()
    assert not syncs.found, syncs.describe()


def test_host_sync_check_counts_each_read_once():
    """Host reads by aten op, repeat_interleave only without an output size, .tolist() once per call."""
    x = torch.tensor([0, 3, 0, 5])
    with HostSyncs() as any_device:
        x.nonzero(), x.sum().item(), x.repeat_interleave(2), torch.repeat_interleave(x), x.repeat_interleave(x)
        x.repeat_interleave(x, output_size=8)
        x.tolist()
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__  # unwrapped after
    assert any_device.found["tolist"] == 1
    assert any_device.found["nonzero"] == 1 and any_device.found["repeat_interleave"] == 2, any_device.found
    assert any_device.found["_local_scalar_dense"] >= 1


def test_moe_iterations_repeat_only_with_device_token_counts(mcore):
    """Other tokens, the same work: with device token counts two iterations (after a first that builds the caches)
    run the same ops on the same tensors, forward and backward; with host counts the expert rows are split by numbers
    that change with the tokens, which the trace names with the line of code."""
    _, iteration = _tiny_moe("experts", "device")
    iteration(0)
    first, second = _traces(iteration, 1, 2)
    assert first_difference(first, second) is None
    grouped = [op for op, _, _ in second.ops if op.startswith("aten._grouped_mm")]
    assert len(grouped) == 12, len(grouped)  # 2 MoE layers x (fc1, fc2; backward: 2 dgrad + 2 trainable wgrad)
    _, iteration = _tiny_moe("experts", "host")
    iteration(0)
    difference = first_difference(*_traces(iteration, 1, 2))
    assert difference is not None and "megatron_esft/experts/grouped.py:" in difference, difference
    _, iteration = _tiny_moe("megatron", "host")
    iteration(0)
    difference = first_difference(*_traces(iteration, 1, 2))
    assert difference is not None and "moe_utils.py" in difference and "split_with_sizes" in difference, difference


def test_fp8_moe_iterations_repeat_with_device_token_counts(mcore):
    """FP8 experts (experts/fp8_device_counts.py; the CPU emulates the scaled GEMMs): after the first iteration
    (which quantizes the frozen experts into the stacks' tails), every iteration quantizes the trained experts into
    the same stacks' heads and runs the same ops on the same tensors."""
    _, iteration = _tiny_moe("experts", "device", "fp8")
    iteration(0)
    first, second = _traces(iteration, 1, 2)
    assert first_difference(first, second) is None
    grouped = [op for op, _, _ in second.ops if op.startswith("aten._grouped_mm")]
    assert len(grouped) == 12, len(grouped)  # 2 MoE layers x (fc1, fc2; backward: 2 dgrad + 2 trainable wgrad)


def test_frozen_weights_replaced_between_iterations_are_found(mcore):
    """A checkpoint load that gives a frozen expert Parameter new storage makes the device-count experts stack
    their weights again: a graph captured before would still read the old stack."""
    model, iteration = _tiny_moe("experts", "device")
    iteration(0)
    first, = _traces(iteration, 1)
    frozen = next(p for n, p in model.named_parameters() if n.endswith("fc1_frozen"))
    frozen.data = frozen.data.clone()
    second, = _traces(iteration, 1)
    difference = first_difference(first, second)
    assert difference is not None and "experts/device_counts.py" in difference, difference


def test_op_trace_names_what_a_replay_would_get_wrong():
    kept = {"w": torch.ones(3)}
    step = {"n": 0}

    def iteration(x):
        h = x + 1  # made inside the iteration: its address is the graph's own
        return h * kept["w"] * torch.tensor([step["n"]]) * torch.tensor([2.0])

    x = torch.ones(3)
    first, second = _traces(iteration, x, x)
    assert first_difference(first, second) is None and len(first.ops) == 6  # add, 2 literals, 3 muls
    kept["w"].add_(1.0)  # updated in place (an optimizer step): the graph reads the new values
    keep_h = iteration(x)  # (holds a result, so the next iteration's intermediates land elsewhere)
    again, = _traces(iteration, x)
    assert first_difference(first, again) is None and keep_h is not None

    old = kept["w"]
    kept["w"] = torch.ones(3)  # a tensor from before the iteration, now at another address (`old` keeps it alive)
    moved, = _traces(iteration, x)
    difference = first_difference(first, moved)
    assert difference is not None and old is not None
    assert f"aten.mul.Tensor, argument 1: a tensor from before the iteration at {old.data_ptr():#x}+0 -> a tensor " \
           f"from before the iteration at {kept['w'].data_ptr():#x}+0" in difference, difference
    assert difference.startswith("op 2 of 6, at tests/training/test_graph_checks.py:")

    kept["w"] = old
    step["n"] = 1  # a literal from the host that changes per step
    difference = first_difference(first, *_traces(iteration, x))
    assert difference is not None and "argument 0: the host literal [0] (torch.int64) -> the host " \
                                      "literal [1] (torch.int64)" in difference, difference
    step["n"] = 0
    assert first_difference(first, *_traces(lambda x: iteration(x) + 0, x)) == "6 ops -> 7 ops"


def test_large_host_literals_are_compared_by_value():
    offset = {"n": 0.0}

    def iteration(x):
        return x + torch.tensor([offset["n"]] * 100)

    x = torch.ones(100)
    first, same = _traces(iteration, x, x)
    assert first_difference(first, same) is None  # a new host tensor each time, with the same values
    offset["n"] = 1.0
    difference = first_difference(first, *_traces(iteration, x))
    assert difference is not None and "argument 0: the host literal of 100 values (torch.float32) -> the host " \
                                      "literal of 100 values (torch.float32)" in difference, difference


def test_a_moved_tensor_in_a_list_argument_is_named_by_its_position():
    kept = {"w": torch.ones(2)}

    def iteration(x):
        return torch.cat([x + 1, kept["w"]])

    x = torch.ones(2)
    first, = _traces(iteration, x)
    old, kept["w"] = kept["w"], torch.ones(2)
    difference = first_difference(first, *_traces(iteration, x))
    assert old is not None and difference is not None
    assert difference.endswith(f"aten.cat.default, argument 0[1]: a tensor from before the iteration at "
                               f"{old.data_ptr():#x}+0 -> a tensor from before the iteration at "
                               f"{kept['w'].data_ptr():#x}+0"), difference
