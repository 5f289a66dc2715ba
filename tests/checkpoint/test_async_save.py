"""--async-save's checkpoint writer (mcore_checkpoint.save_checkpoint with an AsyncCallsQueue)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_async_save_keeps_the_scheduled_values_and_publishes_on_finalize(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("async_save_worker.py")), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"tracker_while_writing": "1", "published": [2], "tracker": "2",
                      "saved_is_scheduled_value": True, "leftovers": []}
