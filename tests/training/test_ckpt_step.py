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
