"""Bad inputs to the converters and the parity tool: one-line error, exit 2, no traceback, nothing written."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_tool


def assert_user_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_tool("convert_hf_to_mcore", "--hf", tmp_path / "empty", "--out", tmp_path / "out")
    assert_user_error(proc, "no config.json")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tiny_hf, tmp_path):
    hf = edited_copy(Path(tiny_hf("deepseek-v2")), tmp_path / "hf", model_type="mixtral")
    proc = run_tool("convert_hf_to_mcore", "--hf", hf, "--out", tmp_path / "out")
    assert_user_error(proc, "unsupported architecture")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, fragment", [({"num_hidden_layers": 4}, "missing"),
                                               ({"vocab_size": 640}, "does not match the config")])
def test_weights_incompatible_with_config(changes, fragment, tiny_hf, tmp_path):
    hf = edited_copy(Path(tiny_hf("deepseek-v2")), tmp_path / "hf", **changes)
    proc = run_tool("convert_hf_to_mcore", "--hf", hf, "--out", tmp_path / "out")
    assert_user_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model(tiny_hf, tmp_path):
    small = tiny_hf("deepseek-v2")
    other = tiny_hf("deepseek-v2", layers=4)
    assert run_tool("convert_hf_to_mcore", "--hf", small, "--out", tmp_path / "mcore").returncode == 0
    proc = run_tool("compare_logits", "--hf", other, "--load", tmp_path / "mcore")
    assert_user_error(proc, "num_layers")
    proc = run_tool("convert_mcore_to_hf", "--load", tmp_path / "nothing", "--out", tmp_path / "back")
    assert_user_error(proc, "does not exist")
    assert not (tmp_path / "back").exists()
    proc = run_tool("convert_mcore_to_hf", "--load", tmp_path / "mcore", "--out", tmp_path / "back", "--iteration", 5)
    assert_user_error(proc, f"{tmp_path / 'mcore'}: no checkpoint of iteration 5 (saved: 0)")
    assert not (tmp_path / "back").exists()
    # an --out that is not an earlier HF export is refused before anything is read (it would be replaced whole)
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "notes.md").write_text("mine")
    proc = run_tool("convert_mcore_to_hf", "--load", tmp_path / "mcore", "--out", tmp_path / "back")
    assert_user_error(proc, f"--out {tmp_path / 'back'}: exists and holds 'notes.md', which this tool does not write")
    assert os.listdir(tmp_path / "back") == ["notes.md"]
    proc = run_tool("convert_hf_to_mcore", "--hf", small, "--out", tmp_path / "mcore")
    assert_user_error(proc, "not empty")
