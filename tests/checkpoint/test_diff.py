"""tools/diff_checkpoints.py (checkpoint/diff.py): which tensors of a HF checkpoint differ from another's, bit for
bit, and whether they are exactly what an expert config trains."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXPERT = "model.layers.{}.mlp.experts.{}.{}_proj.weight"


def _tool(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "tools" / "diff_checkpoints.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _nudged_copy(src, dst, names):
    """A copy of HF checkpoint `src` with the first element of each tensor in `names` one ulp up."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = Path(dst).glob("*.safetensors")
    tensors = load_file(str(path))
    for name in names:
        flat = tensors[name].view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


@pytest.fixture
def models(tiny_hf, tmp_path):
    base = tiny_hf("deepseek-v2", layers=3, experts=8, topk=2)
    trained = _nudged_copy(base, tmp_path / "trained", [EXPERT.format(1, 0, "gate"), EXPERT.format(1, 2, "down"),
                                                        EXPERT.format(2, 5, "up")])
    return base, trained


def _config(tmp_path, experts, **flags):
    path = tmp_path / "ecfg.json"
    path.write_text(json.dumps({"experts": experts, "shared_experts": False, "non_expert_modules": False,
                                **flags}))
    return path


def test_lists_the_changed_experts_and_checks_them_against_an_expert_config(models, tmp_path):
    base, trained = models
    proc = _tool("--base", base, "--other", trained, "--expert-config", _config(tmp_path, {"1": [0, 2], "2": [5, 6]}))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(": 3 differ") and lines[1] == "  routed experts changed: layer 1: 0, 2; layer 2: 5"
    assert lines[2] == "  other tensors changed: none" and lines[3].startswith("only what --expert-config")
    data = json.loads(_tool("--base", base, "--other", trained, "--json").stdout)
    assert data["changed"] == 3 and data["changed_experts"] == {"1": [0, 2], "2": [5]}
    assert data["matches_expert_config"] is None and data["tensors"] > 3
    same = json.loads(_tool("--base", base, "--other", base, "--json").stdout)
    assert same["changed"] == 0


def test_a_change_outside_the_expert_config_fails_with_one_line(models, tmp_path):
    base, trained = models
    proc = _tool("--base", base, "--other", trained, "--expert-config", _config(tmp_path, {"1": [0, 2], "2": []}))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {trained}: layer 2: routed experts [5] changed, which the expert config does not select "
        f"(--expert-config {tmp_path / 'ecfg.json'})"]
    norm = "model.layers.1.input_layernorm.weight"
    touched = _nudged_copy(trained, tmp_path / "touched", [norm])
    proc = _tool("--base", base, "--other", touched, "--expert-config", _config(tmp_path, {"1": [0, 2], "2": [5]}))
    assert proc.returncode == 1 and f"tensor {norm} changed, which the expert config keeps frozen" in proc.stderr
    proc = _tool("--base", base, "--other", touched, "--expert-config",
                 _config(tmp_path, {"1": [0, 2], "2": [5]}, non_expert_modules=True))
    assert proc.returncode == 0, proc.stderr  # the config trains the non-expert modules too


def test_different_models_are_refused(models, tiny_hf):
    base, _ = models
    other = tiny_hf("deepseek-v2", layers=2, experts=8, topk=2)
    proc = _tool("--base", base, "--other", other)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {other}: not the same tensors as {base}")
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = _tool("--base", base, "--other", Path(base).parent / "nope")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {Path(base).parent / 'nope'}: no such directory (expected a Hugging Face checkpoint)"]
