"""megatron_esft/parallel.py: a one-rank gloo process group is destroyed when the process exits (left to the
interpreter's teardown it aborted ~4 % of successful CPU runs: "terminate called without an active exception")."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXIT_WITHOUT_DESTROY = r"""
import torch.distributed as dist
from megatron_esft.parallel import ParallelConfig, initialize

destroy = dist.destroy_process_group

def reported_destroy(group=None):
    if group is None:  # the default group (Megatron-Core's destroy_model_parallel destroys its subgroups too)
        print("default process group destroyed", flush=True)
    return destroy(group)

dist.destroy_process_group = reported_destroy
initialize(ParallelConfig(), seed=1)
print("initialized", dist.is_initialized(), dist.get_backend(), flush=True)
"""


def test_gloo_group_destroyed_at_exit():
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_DESTROY], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["initialized True gloo", "default process group destroyed"], proc.stdout
