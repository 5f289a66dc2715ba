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


TIMEOUTS = r"""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron_esft.errors import run_cli
from megatron_esft.parallel import ParallelConfig, initialize

minutes = None if sys.argv[1] == "none" else int(sys.argv[1])
run_cli(lambda: initialize(ParallelConfig(distributed_timeout_minutes=minutes), seed=1))
for group in (dist.group.WORLD, ps.get_data_parallel_group(), ps.get_expert_data_parallel_group()):
    print(group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60)
"""


def _timeouts(minutes: str, env_minutes: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("ESFT_DIST_TIMEOUT_MIN", None)
    if env_minutes is not None:
        env["ESFT_DIST_TIMEOUT_MIN"] = env_minutes
    return subprocess.run([sys.executable, "-c", TIMEOUTS, minutes], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_distributed_timeout_reaches_the_default_group_and_megatron_core_groups():
    """--distributed-timeout-minutes (ParallelConfig.distributed_timeout_minutes), else $ESFT_DIST_TIMEOUT_MIN, else
    30, for the default group and the groups Megatron-Core makes (which take 30 unless told)."""
    for minutes, env_minutes, expected in (("7", None, 7.0), ("none", "12", 12.0), ("none", None, 30.0),
                                           ("7", "12", 7.0)):
        proc = _timeouts(minutes, env_minutes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [float(x) for x in proc.stdout.split()] == [expected] * 3, (minutes, env_minutes, proc.stdout)
    bad = _timeouts("0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --distributed-timeout-minutes 0: must be at least 1"
    bad = _timeouts("none", "soon")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("ESFT_DIST_TIMEOUT_MIN='soon': must be a whole "
                                                              "number of minutes, at least 1")


def test_initializing_again_leaves_no_old_groups_or_their_threads():
    """Megatron-Core's destroy_model_parallel only forgets its groups; a gloo group's transport thread lives as long
    as the group. Re-initializing used to add 17 groups and 51 threads each time: thousands of threads in the test
    process, whose wakeups took most of the CPU."""
    import gc

    import torch.distributed as dist

    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    registry = dist.distributed_c10d._world.pg_map
    groups, threads = len(registry), len(os.listdir("/proc/self/task"))
    for _ in range(3):
        initialize(ParallelConfig(), seed=1)
    gc.collect()
    assert len(registry) == groups
    assert len(os.listdir("/proc/self/task")) <= threads + 4
