"""Helpers of the training tests: the tiny run's settings and expert config, running the tools and the trainer in a
subprocess, reading their logs and checkpoints. A module of its own (not conftest.py) so that `from training_helpers
import ...` finds it whichever test directories pytest is given: every test directory without an __init__.py puts its
conftest under the one name `conftest`, and the last one imported would win.

Expert config `ECFG` (4 layers: dense 0, MoE 1..3): layer 1 trains experts 0 and 2 (both on EP rank 0 of 2), layer 2
trains expert 5 (EP rank 1), layer 3 nothing: under EP=2 each rank trains nothing in some layer, the case that hangs
without the all-to-all guard.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ECFG = {"experts": {"1": [0, 2], "2": [5], "3": []}, "shared_experts": False, "non_expert_modules": False}
SELECTED = {(1, 0), (1, 2), (2, 5)}
TRAIN = ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "48", "--lr", "1e-3",
         "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1", "--split", "90,10"]
# the reference run's schedule: 6 iterations, checkpoints and validation every 3; runs compared with the reference
# (its losses, its checkpoints) use it too
REFERENCE_SCHEDULE = ["--train-iters", "6", "--save-interval", "3", "--eval-interval", "3"]
WORDS = "the cat sat on a mat dog ran far away blue sky green tree red car fast slow big small".split()


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


def run(args, nproc: int = 1, timeout: int = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`python args...` (nproc 1) or torchrun with `nproc` ranks; fails the test with the output on error/timeout."""
    if nproc == 1:
        cmd = [PY, *map(str, args)]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=_env(1 if nproc > 1 else 2))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s (hang?): {cmd}\n{exc.stdout}\n{exc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"failed ({proc.returncode}): {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pretrain(load, save, *extra, nproc: int = 1, check: bool = True, data=None):
    args = ["pretrain_esft.py", "--load", load, "--train-data", data, *TRAIN, *extra]
    if save:
        args += ["--save", save]
    return run(args, nproc=nproc, check=check)


def losses(proc) -> list[float]:
    return [float(x) for x in re.findall(r"^ iteration .*\| lm loss: ([0-9.E+-]+)", proc.stdout, re.M)]


def logged(proc, field: str) -> list[float]:
    """A numeric field of every iteration line, e.g. `params norm`."""
    return [float(x) for x in re.findall(rf"^ iteration .*\| {field}: ([0-9.E+-]+) \|", proc.stdout, re.M)]


def to_hf(load, out, iteration=None) -> dict:
    args = ["tools/convert_mcore_to_hf.py", "--load", load, "--out", out]
    if iteration is not None:
        args += ["--iteration", iteration]
    run(args)
    return load_hf(out)


def load_hf(directory) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(path))
    return out


def load_mcore(load, iteration: int) -> dict:
    """Model tensors of a checkpoint iteration, read with torch's checkpoint reader (no Megatron, no process group);
    routed experts stay stacked [E, ...] along the global expert axis."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(os.path.join(load, f"iter_{iteration:07d}"))
    meta = reader.read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith(("decoder.", "embedding.", "output_layer."))
            and hasattr(meta[k], "size") and not k.endswith("_extra_state")]
    out = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def selected_name(name: str) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.", name)
    return bool(m) and (int(m.group(1)), int(m.group(2))) in SELECTED
