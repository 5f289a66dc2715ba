"""kill -9 while a checkpoint is being written: the previous checkpoint stays the latest and resumes fine."""

import glob
import os
import signal
import subprocess
import time

import pytest

import torch

from training_helpers import PY, REPO, TRAIN, _env, load_mcore


def test_kill_during_save_keeps_previous_checkpoint(training_env):
    from megatron_esft.checkpoint.mcore_checkpoint import iteration_dir, read_meta, read_tracker

    save = str(training_env["root"] / "killed")
    cmd = [PY, "pretrain_esft.py", "--load", training_env["base"], "--save", save, "--train-data",
           training_env["data"], "--expert-config", training_env["ecfg"], "--train-iters", "40", "--save-interval",
           "1", *TRAIN]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
            if done and glob.glob(os.path.join(save, ".iter_*.tmp-*")):
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
                killed_at = time.time()
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if killed_at is None:
        pytest.fail("never saw a save in progress")
    latest = read_tracker(save)
    assert os.path.isdir(iteration_dir(save, latest))
    assert read_meta(save)["train_state"]["iteration"] == latest
    # the interrupted save left only a hidden temp dir; the previous checkpoint reads back whole
    weights = load_mcore(save, latest)
    assert len(weights) > 20 and all(torch.isfinite(t).all() for t in weights.values())
    assert glob.glob(os.path.join(save, ".iter_*.tmp-*"))
