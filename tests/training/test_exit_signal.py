"""--exit-signal-handler: SIGTERM mid-run finishes the iteration, saves a resumable checkpoint and exits 0."""

import re
import signal
import subprocess
import time

from tests.training.conftest import PY, REPO, TRAIN, _env


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
