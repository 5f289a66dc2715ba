"""Checkpoint layout of the grouped experts == SequentialMLP's, for any split; dist_checkpointing round trips."""

import pytest
import torch
from tiny import batch, build_model, freeze_grouped, loss_of, tiny_config

MIXED = {2: [1, 5, 6]}


def _layout(model):
    """{(sharded key, global offset): (global shape, local shape, replica id, dtype)} after applying factories."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    layout = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            layout[(item.key, item.global_offset)] = (item.global_shape, item.local_shape, item.replica_id, item.dtype)
        elif isinstance(item, ShardedObject):
            layout[(item.key, item.global_offset)] = (item.global_shape, item.replica_id)
    return layout


@pytest.mark.parametrize("trainable", [{}, MIXED, {2: list(range(8))}])
def test_state_dict_and_sharded_layout_identical_to_sequential(mcore, trainable):
    config = tiny_config()
    ref, ours = build_model(config, grouped=False), build_model(config, grouped=True)
    freeze_grouped(ours, trainable)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all((v is None and ours_sd[k] is None) or v.shape == ours_sd[k].shape for k, v in ref_sd.items())
    ref_layout, ours_layout = _layout(ref), _layout(ours)
    assert any("experts.experts.linear_fc1.weight" in key for key, _ in ours_layout)
    assert ours_layout == ref_layout


def _roundtrip(save_model, load_model, path):
    from megatron.core import dist_checkpointing

    path.mkdir()
    dist_checkpointing.save(save_model.sharded_state_dict(), str(path))
    loaded = dist_checkpointing.load(load_model.sharded_state_dict(), str(path))
    missing, unexpected = load_model.load_state_dict(loaded, strict=True)
    assert not missing and not unexpected


def _assert_same_weights(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k, v in sd_a.items():
        if v is not None:
            assert torch.equal(v, sd_b[k]), k


def test_roundtrips_sequential_to_grouped_and_back(mcore, tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    ref = build_model(config, grouped=False)
    torch.manual_seed(1)  # different init, so a no-op load would be caught
    ours = build_model(config, grouped=True)
    freeze_grouped(ours, MIXED)

    _roundtrip(ref, ours, tmp_path / "seq")  # SequentialMLP checkpoint -> grouped (mixed split)
    _assert_same_weights(ref, ours)
    data = batch(seed=3)
    assert loss_of(ours, data).item() == pytest.approx(loss_of(ref, data).item(), abs=1e-6)

    with torch.no_grad():  # change the grouped weights, then grouped checkpoint -> SequentialMLP
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _roundtrip(ours, ref, tmp_path / "grouped")
    _assert_same_weights(ref, ours)

    torch.manual_seed(2)
    other = build_model(config, grouped=True)  # grouped (one split) -> grouped (another split)
    freeze_grouped(other, {2: [0, 7]})
    _roundtrip(ours, other, tmp_path / "grouped2")
    _assert_same_weights(ours, other)


def test_fp32_optimizer_state_layout_matches_sequential(mcore, tmp_path):
    """All-trainable: the optimizer state of a group Parameter is written per expert under SequentialMLP's optimizer
    keys (the group factory splits it), so it loads into a SequentialMLP model's optimizer."""
    from megatron.core import dist_checkpointing
    from test_optimizer import _step, _train_setup

    config = tiny_config()
    torch.manual_seed(0)
    ref, ours = build_model(config, grouped=False), build_model(config, grouped=True)
    ddp_ours, opt_ours = _train_setup(ours, config, False)
    ddp_ref, opt_ref = _train_setup(ref, config, False)
    for step in range(2):
        _step(ddp_ours, opt_ours, batch(seed=step))
        _step(ddp_ref, opt_ref, batch(seed=step + 10))  # something else, so the load must overwrite it
    sharded = ours.sharded_state_dict()
    dist_checkpointing.save({"model": sharded, "optimizer": opt_ours.sharded_state_dict(sharded)}, str(tmp_path))
    sharded = ref.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": sharded, "optimizer": opt_ref.sharded_state_dict(sharded, is_loading=True)}, str(tmp_path)
    )
    ref.load_state_dict(loaded["model"])
    opt_ref.load_state_dict(loaded["optimizer"])
    experts_ours = ours.decoder.layers[1].mlp.experts
    state_ours = opt_ours.chained_optimizers[-1].optimizer.state
    state_ref = opt_ref.chained_optimizers[-1].optimizer.state
    for j, expert in enumerate(ref.decoder.layers[1].mlp.experts.local_experts):
        for proj in ("fc1", "fc2"):
            group, row = experts_ours.placement(j)
            ours_state = state_ours[getattr(experts_ours, f"{proj}_{group}")]
            ref_state = state_ref[getattr(expert, f"linear_{proj}").weight]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ref_state[key], ours_state[key][row]), (j, proj, key)
