"""--ckpt-step (Megatron-LM): resume from an earlier iteration than the latest, exactly as the run went on from it."""

import shutil

import torch

from training_helpers import load_mcore, losses, pretrain


def test_resume_from_an_earlier_iteration_replays_the_reference(training_env, reference, tmp_path):
    env = training_env
    save = tmp_path / "again"
    shutil.copytree(reference["save"], save)  # resume in place: iterations 3 and 6 there, the tracker at 6
    proc = pretrain(str(save), str(save), "--ckpt-step", "3", "--train-iters", "6", "--eval-interval", "3",
                    data=env["data"])
    assert f"resumed from {save} at iteration 3" in proc.stdout
    assert losses(proc) == reference["losses"][3:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    straight, resumed = load_mcore(reference["save"], 6), load_mcore(str(save), 6)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name

    missing = pretrain(reference["save"], None, "--ckpt-step", "4", "--train-iters", "6", data=env["data"],
                       check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: --ckpt-step 4: --load {reference['save']} has no complete checkpoint of that iteration (saved: 3, 6)"]


def test_no_load_optim_starts_adam_afresh_from_the_loaded_weights(training_env, reference, tmp_path):
    """--no-load-optim --no-load-rng (Megatron-LM's flags) resuming at iteration 3: the loaded weights give the
    reference loss of iteration 4, and the update is Adam's first step (bias-corrected m / sqrt(v) = sign of the
    gradient, so almost every trained element with a gradient moves by the learning rate, plus the small decoupled
    weight decay); the optimizer step count restarts (1, not 4)."""
    import json

    env = training_env
    save = str(tmp_path / "fresh")
    proc = pretrain(reference["save"], save, "--ckpt-step", "3", "--train-iters", "4", "--no-load-optim",
                    "--no-load-rng", data=env["data"])
    assert "note: optimizer state not loaded (Adam starts afresh); RNG states not restored" in proc.stdout
    assert losses(proc) == reference["losses"][3:4]
    meta = json.loads((tmp_path / "fresh" / "iter_0000004" / "esft_meta.json").read_text())
    assert meta["optimizer_step"] == 1
    before, after = load_mcore(reference["save"], 3), load_mcore(save, 4)
    key = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"  # layer 1 trains experts 0 and 2
    w0, w1 = before[key][[0, 2]].double(), after[key][[0, 2]].double()
    # AdamW (lr 1e-3, weight decay 0.1): w1 = w0 * (1 - lr * wd) - lr * update; a fresh Adam's first update is
    # g / (|g| + eps) elementwise: +-1, a little less where |g| is near eps (1e-8), 0 without a gradient
    update = ((w0 * (1 - 1e-3 * 0.1) - w1) / 1e-3).abs().flatten()
    moved = update[update > 0.1]
    assert moved.numel() > 0.5 * update.numel()
    assert float(moved.max()) <= 1 + 1e-3 and float(((moved - 1).abs() <= 1e-2).double().mean()) >= 0.95, \
        (moved.min(), moved.median(), moved.max())
    assert torch.equal(after[key][1], before[key][1])  # a frozen expert


def test_no_save_optim_checkpoints_resume_with_a_fresh_adam(training_env, reference, tmp_path):
    """--no-save-optim --no-save-rng (Megatron-LM's flags): the checkpoint holds the model only (no optimizer or RNG
    keys) and says so in its meta; resuming from it trains on from its weights (iteration 4's reference loss) with
    Adam started afresh (step count 1) and the seeded RNG states."""
    import json

    from torch.distributed.checkpoint import FileSystemReader

    env = training_env
    save = tmp_path / "lean"
    first = pretrain(env["base"], str(save), "--expert-config", env["ecfg"], "--train-iters", "3", "--no-save-optim",
                     "--no-save-rng", data=env["data"])
    assert losses(first) == reference["losses"][:3]
    keys = set(FileSystemReader(str(save / "iter_0000003")).read_metadata().state_dict_metadata)
    assert keys and all(k.startswith(("decoder.", "embedding.", "output_layer.")) for k in keys), sorted(keys)[:5]
    full = set(FileSystemReader(f"{reference['save']}/iter_0000003").read_metadata().state_dict_metadata)
    assert any(k.startswith("optimizer.") for k in full) and any(k.startswith("rng_state") for k in full)
    meta = json.loads((save / "iter_0000003" / "esft_meta.json").read_text())
    assert meta["optimizer_saved"] is False and meta["rng_saved"] is False
    resumed = pretrain(str(save), str(save), "--train-iters", "4", data=env["data"])
    assert "note: optimizer state not loaded (Adam starts afresh); RNG states not restored" in resumed.stdout
    assert losses(resumed) == reference["losses"][3:4]
    assert json.loads((save / "iter_0000004" / "esft_meta.json").read_text())["optimizer_step"] == 1
