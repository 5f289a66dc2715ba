"""--exit-signal-handler: SIGTERM mid-run finishes the iteration, saves a resumable checkpoint and exits 0.
--exit-duration-in-mins: the same once the time is up."""

import re
import signal
import subprocess
import time

import torch

from training_helpers import PY, REPO, TRAIN, _env, load_mcore, losses, pretrain


def test_sigterm_saves_and_exits(training_env):
    save = training_env["root"] / "signal"
    cmd = [PY, "pretrain_esft.py", "--load", training_env["base"], "--save", str(save), "--train-data",
           training_env["data"], *TRAIN, "--expert-config", training_env["ecfg"], "--train-iters", "100000",
           "--exit-signal-handler"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # wait until training is under way
            lines.append(line)
            match = re.match(r" iteration +(\d+)/ *100000 \|", line)
            if (match and int(match.group(1)) >= 2) or time.monotonic() > deadline:
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stdout.readlines()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert "exit signal received: saving at iteration" in out
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 100000
    assert f"saved checkpoint at iteration {saved:7d}" in out


def test_exit_duration_saves_at_the_first_iteration_past_it_and_resumes_like_the_reference(training_env, reference,
                                                                                          tmp_path):
    env, save = training_env, str(tmp_path / "timed")
    first = pretrain(env["base"], save, "--expert-config", env["ecfg"], "--train-iters", "6", "--eval-interval", "3",
                     "--exit-duration-in-mins", "1e-9", data=env["data"])  # start-up alone takes longer
    assert re.search(r"^exiting program after [0-9.e-]+ minutes$", first.stdout, re.M), first.stdout[-2000:]
    assert int((tmp_path / "timed" / "latest_checkpointed_iteration.txt").read_text()) == 1
    assert len(losses(first)) == 1
    second = pretrain(save, save, "--train-iters", "6", "--eval-interval", "3", data=env["data"])
    assert losses(first) + losses(second) == reference["losses"]
    straight, resumed = load_mcore(reference["save"], 6), load_mcore(save, 6)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
