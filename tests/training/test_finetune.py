"""--finetune (Megatron-LM): a training checkpoint's model weights start a new run; nothing else is carried over."""

import json
import os

import torch

from training_helpers import load_mcore, losses, pretrain


def test_finetune_starts_a_new_run_from_a_training_checkpoints_weights(training_env, reference, tmp_path):
    env, save = training_env, str(tmp_path / "ft")
    # without --finetune the ESFT checkpoint would be resumed, and it cannot be resumed in another mode
    refused = pretrain(reference["save"], None, "--finetune-mode", "full", "--train-iters", "8", data=env["data"],
                       check=False)
    assert refused.returncode == 2 and "resume with the same mode" in refused.stderr
    # --lr 0: the saved weights are exactly the ones loaded (with the flags Megatron-LM fine-tuning scripts pass)
    proc = pretrain(reference["save"], save, "--finetune", "--no-load-optim", "--no-load-rng", "--finetune-mode",
                    "full", "--train-iters", "2", "--lr", "0", "--min-lr", "0", data=env["data"])
    assert "resumed from" not in proc.stdout
    assert f"--finetune: model weights of {reference['save']} at iteration 6; new run from iteration 0" in proc.stdout
    assert len(losses(proc)) == 2 and " iteration        2/       2 |" in proc.stdout
    # the first batch is the reference run's first batch (same seed, new data position), seen by trained weights
    assert losses(proc)[0] != reference["losses"][0]
    loaded, saved = load_mcore(reference["save"], 6), load_mcore(save, 2)
    assert set(loaded) == set(saved)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, saved[name]), name
    with open(os.path.join(save, "iter_0000002", "esft_meta.json")) as fh:
        meta = json.load(fh)
    assert meta["kind"] == "full" and meta["expert_config"] is None
    assert meta["base_checkpoint"] == {"load": os.path.abspath(reference["save"]), "iteration": 6}
    assert meta["train_state"]["iteration"] == 2 and meta["train_state"]["consumed_samples"] == 8
