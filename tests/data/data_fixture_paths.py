"""Paths of the data-pipeline test fixtures (a module with a unique name, importable from the tests)."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SMALL_CHAT = HERE / "fixtures" / "chat_small.jsonl"
MIXED_CHAT = HERE / "fixtures" / "chat_mixed.jsonl"
OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "esft_official" / "datasets"


def official_file(split: str, task: str) -> Path:
    """An official ESFT dataset file; skips the test when the shared fixtures are absent."""
    path = OFFICIAL / split / f"{task}.jsonl"
    if not path.is_file():
        pytest.skip(f"official ESFT fixtures not found at {OFFICIAL}")
    return path
