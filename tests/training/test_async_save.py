"""--async-save: the reference run with its checkpoints written in the background gives the same checkpoints, bit for
bit, and resuming from one of them replays the reference."""

import torch

from training_helpers import REFERENCE_SCHEDULE, load_mcore, losses, pretrain


def test_async_checkpoints_equal_the_synchronous_ones_and_resume_exactly(training_env, reference, tmp_path):
    env, save = training_env, str(tmp_path / "async")
    proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *REFERENCE_SCHEDULE, "--async-save",
                    data=env["data"])
    assert losses(proc) == reference["losses"]
    for it in (3, 6):
        assert f"scheduled checkpoint save at iteration {it:7d} to {save} " in proc.stdout
        assert f"saved checkpoint at iteration {it:7d} to {save} (" in proc.stdout
        ours, ref = load_mcore(save, it), load_mcore(reference["save"], it)
        assert set(ours) == set(ref)
        for name, tensor in ref.items():
            assert torch.equal(tensor, ours[name]), (it, name)
    assert (tmp_path / "async" / "best" / "latest_checkpointed_iteration.txt").exists()
    assert (tmp_path / "async" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    # optimizer, RNG, data position and schedule went into the background save too
    resumed = pretrain(save, None, "--ckpt-step", "3", "--train-iters", "6", "--eval-interval", "3", data=env["data"])
    assert losses(resumed) == reference["losses"][3:]
