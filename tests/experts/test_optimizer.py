"""Frozen experts under Megatron DDP + get_megatron_optimizer (AdamW, weight_decay=0.1): no grad buffer, no state,
bit-identical after steps; training matches the SequentialMLP reference step by step."""

import torch
from tiny import batch, build_model, copy_sequential_to_grouped, freeze_grouped, freeze_sequential, loss_of, moe_experts, tiny_config

TRAINABLE = {2: [1, 5, 6]}


def _train_setup(model, config, use_distributed_optimizer, bf16=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0, bf16=bf16,
                        params_dtype=torch.bfloat16 if bf16 else torch.float32,
                        use_distributed_optimizer=use_distributed_optimizer),
        [ddp],
    )
    return ddp, optimizer


def _step(ddp, optimizer, data):
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = loss_of(ddp, data)
    loss.backward()
    finalize_model_grads([ddp])
    optimizer.step()
    return loss.item()


def _optimizer_params(optimizer):
    params = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params += [p for group in opt.optimizer.param_groups for p in group["params"]]
        params += list(opt.optimizer.state.keys())
    return {id(p) for p in params}


def test_frozen_experts_untouched_by_adamw_and_training_matches_reference(mcore):
    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1])
    torch.manual_seed(0)
    ref, ours = build_model(config, grouped=False), build_model(config, grouped=True)
    copy_sequential_to_grouped(ref, ours)
    freeze_sequential(ref, TRAINABLE)
    freeze_grouped(ours, TRAINABLE)
    initial = {k: v.clone() for k, v in ours.state_dict().items() if v is not None}
    ddp_ref, opt_ref = _train_setup(ref, config, False)
    ddp_ours, opt_ours = _train_setup(ours, config, False)

    for step in range(3):
        data = batch(seed=step)
        loss_ref, loss_ours = _step(ddp_ref, opt_ref, data), _step(ddp_ours, opt_ours, data)
        assert abs(loss_ref - loss_ours) <= 1e-5, (step, loss_ref, loss_ours)

    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(ours_sd[key], ref_sd[key], rtol=0, atol=1e-5, msg=key)
        parts = key.split(".")
        if "local_experts" in parts:
            layer = int(parts[parts.index("layers") + 1]) + 1
            expert = int(parts[parts.index("local_experts") + 1])
            if expert in TRAINABLE.get(layer, ()):
                assert not torch.equal(ours_sd[key], value), f"trainable {key} did not change"
            else:
                assert torch.equal(ours_sd[key], value), f"frozen {key} changed (weight decay?)"

    in_optimizer = _optimizer_params(opt_ours)
    for _, experts in moe_experts(ours):
        for proj in ("fc1", "fc2"):
            frozen, trainable = getattr(experts, f"{proj}_frozen"), getattr(experts, f"{proj}_trainable")
            assert not hasattr(frozen, "main_grad") and frozen.grad is None
            assert id(frozen) not in in_optimizer
            if trainable.numel():
                assert hasattr(trainable, "main_grad") and id(trainable) in in_optimizer
            else:
                assert id(trainable) not in in_optimizer


def test_distributed_optimizer_checkpoint_resume(mcore, tmp_path):
    """Model + DistributedOptimizer state (dp_reshardable) of a split grouped model: saved, then restored exactly."""
    from megatron.core import dist_checkpointing

    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config, grouped=True)
    freeze_grouped(model, {2: [6, 1]})
    ddp, optimizer = _train_setup(model, config, True)
    for step in range(2):
        _step(ddp, optimizer, batch(seed=step))
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    sharded = model.sharded_state_dict()
    dist_checkpointing.save({"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded, metadata=metadata)},
                            str(tmp_path))
    saved_params = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    saved_state = _adam_state(optimizer)
    for step in (2, 3):
        _step(ddp, optimizer, batch(seed=step))
    assert not _same_state(_adam_state(optimizer), saved_state)

    # restore into the same (since advanced) model and optimizer: a fresh torch-AdamW DistributedOptimizer has no
    # 'step' yet and cannot build its sharded_state_dict in Megatron-Core 0.16.1 without Apex/TE
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)},
        str(tmp_path),
    )
    model.load_state_dict(loaded["model"], strict=True)
    with torch.no_grad():  # CPU fp32: the DistributedOptimizer's main params are views of the model params
        optimizer.load_state_dict(loaded["optimizer"])
    assert _same_state(_adam_state(optimizer), saved_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved_params.items())


def _adam_state(optimizer):
    """exp_avg / exp_avg_sq of every optimizer parameter."""
    state = []
    for opt in optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                st = opt.optimizer.state[p]
                state.append({k: st[k].clone() for k in ("exp_avg", "exp_avg_sq")})
    return state


def _same_state(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_fused_adamw_matches_foreach_adamw(mcore, monkeypatch):
    """training/setup.use_fused_adam switches Megatron's torch AdamW to torch's fused kernel: the kernel runs, and
    3 steps land on the multi-tensor ("foreach") AdamW's weights (same update; float rounding only)."""
    from megatron_esft.training.setup import use_fused_adam

    config = tiny_config(num_layers=3, moe_layer_freq=[0, 1, 1])
    torch.manual_seed(0)
    foreach_model, fused_model = build_model(config, grouped=True), build_model(config, grouped=True)
    fused_model.load_state_dict(foreach_model.state_dict())
    runs = []
    for model, fused in ((foreach_model, False), (fused_model, True)):
        freeze_grouped(model, TRAINABLE)
        ddp, optimizer = _train_setup(model, config, use_distributed_optimizer=True)
        if fused:
            assert use_fused_adam(optimizer) >= 1
        calls = []
        original = torch._fused_adamw_
        monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or original(*a, **k))
        for step in range(3):
            _step(ddp, optimizer, batch(seed=step))
        monkeypatch.setattr(torch, "_fused_adamw_", original)
        assert bool(calls) == fused
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    foreach_weights, fused_weights = runs
    assert foreach_weights.keys() == fused_weights.keys() and foreach_weights
    for name, w in foreach_weights.items():
        torch.testing.assert_close(fused_weights[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_fp8_cache_of_trainable_experts_follows_the_distributed_optimizer(mcore):
    """With `fp8_weight_cache="all"` the trainable experts' e4m3 copies are kept between steps and must be re-made
    after each optimizer step. Megatron's DistributedOptimizer writes the new bf16 weights into DDP's parameter buffer
    (of which the Parameters are views), which does not bump their autograd version: without the trainer's
    `note_expert_weights_updated` the cache would keep the first step's weights. Three steps must equal re-quantizing
    every call ("none") bit for bit."""
    from megatron_esft.experts import note_expert_weights_updated, set_expert_gemm_backend

    config = tiny_config(params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True)
    torch.manual_seed(0)
    models = [build_model(config, grouped=True) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    runs = []
    for model, cache in zip(models, ("none", "all")):
        freeze_grouped(model, TRAINABLE)
        set_expert_gemm_backend([model], "fp8", cache)
        ddp, optimizer = _train_setup(model, config, use_distributed_optimizer=True, bf16=True)
        losses = []
        for step in range(3):
            losses.append(_step(ddp, optimizer, batch(seed=step)))
            note_expert_weights_updated([model])
        runs.append(losses)
    assert runs[0][0] != runs[0][2]  # the weights moved
    assert runs[1] == runs[0]
