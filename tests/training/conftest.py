"""Fixtures for the training tests: a tiny DeepSeek-V2 (HF + converted base checkpoint), SFT data, expert configs,
and the ESFT reference run (EP=1) that several tests compare against. Everything is made once per session.

Expert config `ECFG` (4 layers: dense 0, MoE 1..3): layer 1 trains experts 0 and 2 (both on EP rank 0 of 2), layer 2
trains expert 5 (EP rank 1), layer 3 nothing: under EP=2 each rank trains nothing in some layer, the case that hangs
without the all-to-all guard.
"""

from __future__ import annotations

import glob
import json
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


@pytest.fixture(scope="session")
def training_env(tmp_path_factory):
    """Paths of the tiny model, its base checkpoint, data and expert config."""
    from megatron_esft.models.tiny import TinySpec, make_tiny_deepseek

    root = tmp_path_factory.mktemp("training")
    hf = str(root / "hf")
    make_tiny_deepseek(TinySpec(arch="deepseek-v2", layers=4, hidden=64, experts=8, topk=2, moe_ffn=32, vocab=512,
                                seed=3), hf)
    base = str(root / "base")
    run(["tools/convert_hf_to_mcore.py", "--hf", hf, "--out", base])
    import random

    rng = random.Random(0)
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for _ in range(48):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    ecfg = root / "expert_config.json"
    ecfg.write_text(json.dumps(ECFG))
    return {"root": root, "hf": hf, "base": base, "data": str(data), "ecfg": str(ecfg)}


@pytest.fixture(scope="session")
def reference(training_env):
    """ESFT at EP=1 (grouped experts), 6 iterations straight, validation at 0/3/6 (keep-best), checkpoints at 3 and 6,
    TensorBoard, --log-throughput, --log-params-norm and --log-num-zeros-in-grad, plus HF exports of both."""
    env = training_env
    save = str(env["root"] / "ref")
    proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *REFERENCE_SCHEDULE,
                    "--tensorboard-dir", str(env["root"] / "tb"), "--log-throughput",
                    "--log-params-norm", "--log-num-zeros-in-grad", data=env["data"])
    hf3 = to_hf(save, str(env["root"] / "ref-hf-3"), iteration=3)
    hf6 = to_hf(save, str(env["root"] / "ref-hf-6"))
    return {"save": save, "proc": proc, "losses": losses(proc), "hf3": hf3, "hf6": hf6,
            "hf6_dir": str(env["root"] / "ref-hf-6")}
