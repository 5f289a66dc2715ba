"""EP=2 worker (run by test_ep2.py under torchrun, 2 ranks, gloo): grouped experts at EP=2 vs the EP=1 reference.

argv: REF_DIR (EP=1 SequentialMLP checkpoint `ckpt/` + `ref.pt` with loss and expert grads), OUT_DIR (EP=2 checkpoint).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

TRAINABLE_GLOBAL = {2: [1, 5, 6]}  # experts 0-3 on rank 0, 4-7 on rank 1


def main(ref_dir, out_dir):
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_esft.parallel import ParallelConfig, initialize
    from tiny import batch, build_model, expert_grads, freeze_grouped, freeze_sequential, loss_of, moe_experts, tiny_config

    initialize(ParallelConfig(expert_model_parallel_size=2), seed=1234)
    rank = dist.get_rank()
    config = tiny_config(expert_model_parallel_size=2)
    reference = torch.load(os.path.join(ref_dir, "ref.pt"), weights_only=True)
    data = batch(seed=5)

    models = {}
    for grouped in (False, True):
        # the grouped model also dispatches with the gather permutation, checked against Megatron's at EP=2 and EP=1
        model = build_model(config, grouped=grouped, gather_permutation=grouped)
        sharded = model.sharded_state_dict()
        model.load_state_dict(dist_checkpointing.load(sharded, os.path.join(ref_dir, "ckpt")), strict=True)
        local = {layer: [g - 4 * rank for g in ids if g // 4 == rank] for layer, ids in TRAINABLE_GLOBAL.items()}
        (freeze_grouped if grouped else freeze_sequential)(model, local)
        loss = loss_of(model, data)
        if grouped:  # EP = 2: the experts cannot permute their rank's tokens themselves; the dispatcher gathers
            assert {layer.mlp.token_dispatcher.effective_permutation() for layer in model.decoder.layers
                    if hasattr(layer.mlp, "experts")} == {"gather"}
        # same batch on both ranks: loss equals EP=1; each expert sees both ranks' tokens, so its grad is 2x EP=1's
        assert abs(loss.item() - reference["loss"]) <= 1e-6, (rank, grouped, loss.item(), reference["loss"])
        loss.backward()
        models[grouped] = model

    grads_seq, grads_grouped = expert_grads(models[False]), expert_grads(models[True])
    checked = 0
    for (layer, j, proj), g in grads_grouped.items():
        global_id = 4 * rank + j
        ref_key = f"{layer}.{global_id}.{proj}"
        if global_id in TRAINABLE_GLOBAL.get(layer, ()):
            torch.testing.assert_close(g, 2 * reference["grads"][ref_key], rtol=0, atol=2e-6)
            torch.testing.assert_close(g, grads_seq[(layer, j, proj)], rtol=0, atol=1e-6)
            checked += 1
        else:
            assert g is None and grads_seq[(layer, j, proj)] is None
    assert checked == 2 * len([g for g in TRAINABLE_GLOBAL[2] if g // 4 == rank]), checked
    for name, p in models[True].named_parameters():  # every non-expert parameter: same grads as SequentialMLP
        if ".experts." not in name:
            q = dict(models[False].named_parameters())[name]
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)

    # EP=2 grouped checkpoint (weights doubled, so the reader can tell it apart) for the EP=1 side to load
    with torch.no_grad():
        for _, experts in moe_experts(models[True]):
            for p in experts.parameters():
                p.mul_(2)
    dist_checkpointing.save(models[True].sharded_state_dict(), out_dir)
    dist.barrier()
    print(f"rank {rank}: EP=2 OK ({checked} trainable expert grads checked)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
