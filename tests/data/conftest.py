"""Shared fixtures for the data-pipeline tests: the tiny tokenizer and the fixture files."""

import itertools

import pytest
from data_fixture_paths import MIXED_CHAT, SMALL_CHAT, official_file

from megatron_esft.data.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir):
    from megatron_esft.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def small_chat():
    return str(SMALL_CHAT)


@pytest.fixture(scope="session")
def mixed_chat():
    return str(MIXED_CHAT)


@pytest.fixture(scope="session")
def official_slice(tmp_path_factory):
    """First lines of the official intent and law training sets, as one JSONL file (intent first)."""
    out = tmp_path_factory.mktemp("official") / "intent_law_slice.jsonl"
    lines = []
    for task, n in (("intent", 160), ("law", 24)):
        with open(official_file("train", task), encoding="utf-8") as f:
            lines.extend(itertools.islice(f, n))
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)
