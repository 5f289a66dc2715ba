"""Atomic outputs and user-facing JSON reading, shared by every tool.

`atomic_directory(out_dir)` yields a temporary directory next to `out_dir`; when the block finishes, the temporary
directory replaces `out_dir` in one rename, and when it raises, the temporary directory is removed and `out_dir` is
left as it was. So a failed or killed tool never leaves a half-written output under the name the user asked for. An
existing `out_dir` is replaced only if it looks like an earlier output of the same kind (check_replaceable).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from megatron_esft.errors import UserError


# The files of a Hugging Face model directory: weights, index, config, tokenizer, remote code (what our exports write
# and what an earlier export of the same kind left there).
HF_DIRECTORY_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".py", ".tiktoken", ".jinja")


def require_directory_or_absent(flag: str, path: str | None, note: str = "") -> None:
    """UserError if `path` (the value of a directory flag) names an existing file: found before any work, not when
    the first output is written into it."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a directory{note}")


def check_replaceable(out_dir: str, suffixes: tuple[str, ...]) -> None:
    """UserError unless `out_dir` is absent, empty, or holds only files (no directories) whose names end in
    `suffixes`, i.e. looks like an earlier output of the same kind. Replacing a directory removes it whole, so a
    mistaken `--out .` or `--out runs` must not get that far."""
    if not os.path.lexists(out_dir):
        return
    require_directory_or_absent("--out", out_dir)
    if os.path.islink(out_dir):  # replacing it would remove the link, not the directory it names
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if os.path.islink(path) or not os.path.isfile(path) or not name.endswith(suffixes):
            raise UserError(f"--out {out_dir}: exists and holds {name!r}, which this tool does not write; it would "
                            "be replaced whole: give a new or empty directory, or remove it first")


@contextlib.contextmanager
def atomic_directory(out_dir: str, prefix: str = ".tmp-", replaceable: tuple[str, ...] = ()) -> Iterator[str]:
    """`replaceable`: the name suffixes of an earlier output of the same kind that may be replaced (check_replaceable;
    default: only an empty directory)."""
    check_replaceable(out_dir, replaceable)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_file(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` creates the whole file at `tmp`, a new name next to `path` that ends in `path`'s name (so a writer
    that picks its format by the extension, such as a .gz trace, sees the real one); then `tmp` replaces `path` in one
    rename, or is removed if `write` raises: readers never see a half-written file. The writer creates the file, so
    it gets the mode any new file gets (the umask's), as if written in place."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` atomically (`atomic_write_file`)."""
    atomic_write_file(path, lambda tmp: Path(tmp).write_bytes(payload))


def read_json(path: str | os.PathLike):
    """Parse a JSON file; a missing file or invalid JSON is a one-line UserError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable as JSON ({exc})") from None
