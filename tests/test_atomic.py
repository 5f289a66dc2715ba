"""atomic.py: a directory output appears whole or not at all, and replaces only an earlier output of its kind."""

import os

import pytest

from megatron_esft.atomic import HF_DIRECTORY_SUFFIXES, atomic_directory, atomic_write_bytes
from megatron_esft.errors import UserError


def _write(tmp, files):
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
            fh.write(text)


def test_replaces_an_earlier_output_whole(tmp_path):
    out = str(tmp_path / "hf")
    with atomic_directory(out, replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        _write(tmp, {"config.json": "1", "model-00001-of-00002.safetensors": "a",
                     "model-00002-of-00002.safetensors": "b"})
    with atomic_directory(out, replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        _write(tmp, {"config.json": "2", "model.safetensors": "c"})
    # no stale shard of the first export is left next to the second's
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]


@pytest.mark.parametrize("foreign", ["notes.md", "subdir", "link.json"])
def test_refuses_a_directory_that_is_not_an_earlier_output(tmp_path, foreign):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    if foreign == "subdir":
        (out / foreign).mkdir()
    elif foreign == "link.json":
        (out / foreign).symlink_to(tmp_path)  # a link is not followed, nor removed
    else:
        (out / foreign).write_text("mine")
    before = sorted(os.listdir(out))
    entered = []
    with pytest.raises(UserError, match=rf"^--out {out}: exists and holds '{foreign}', which this tool does not write"):
        with atomic_directory(str(out), replaceable=HF_DIRECTORY_SUFFIXES):
            entered.append(True)
    assert not entered and sorted(os.listdir(out)) == before  # refused before any work, nothing touched
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_default_replaces_only_an_empty_directory_and_never_a_file(tmp_path):
    empty, full, file = tmp_path / "empty", tmp_path / "full", tmp_path / "file"
    empty.mkdir()
    full.mkdir()
    (full / "config.json").write_text("{}")
    file.write_text("x")
    with atomic_directory(str(empty)) as tmp:
        _write(tmp, {"a.json": "1"})
    assert os.listdir(empty) == ["a.json"]
    with pytest.raises(UserError, match="holds 'config.json'"):
        with atomic_directory(str(full)):
            pass
    with pytest.raises(UserError, match="exists and is not a directory"):
        with atomic_directory(str(file), replaceable=HF_DIRECTORY_SUFFIXES):
            pass
    assert file.read_text() == "x"


def test_a_failed_block_leaves_the_earlier_output(tmp_path):
    out = str(tmp_path / "hf")
    with atomic_directory(out, replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        _write(tmp, {"config.json": "1"})
    with pytest.raises(RuntimeError):
        with atomic_directory(out, replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
            _write(tmp, {"config.json": "2"})
            raise RuntimeError("killed")
    assert open(os.path.join(out, "config.json")).read() == "1"
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_file_is_written_whole_and_never_over_a_directory(tmp_path):
    atomic_write_bytes(tmp_path / "sub" / "a.json", b"1")
    atomic_write_bytes(tmp_path / "sub" / "a.json", b"2")
    assert (tmp_path / "sub" / "a.json").read_bytes() == b"2" and os.listdir(tmp_path / "sub") == ["a.json"]
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UserError, match=r"d\.png: is a directory, expected a file name$"):
        atomic_write_bytes(tmp_path / "d.png", b"x")
    assert os.listdir(tmp_path / "d.png") == [] and sorted(os.listdir(tmp_path)) == ["d.png", "sub"]
