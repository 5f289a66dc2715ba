"""tools/preprocess_data.py -> Megatron indexed dataset -> the same samples as reading the JSONL directly."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_esft.data import build_sft_datasets, build_tiny_tokenizer, load_tokenizer
from megatron_esft.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"


def preprocess_main():
    sys.path.insert(0, str(TOOL.parent))
    try:
        spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOL.parent))
    return module.main


@pytest.fixture(scope="module")
def indexed(mixed_chat, tiny_tokenizer_dir, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("indexed") / "slice")
    preprocess_main()(["--input", mixed_chat, "--tokenizer", tiny_tokenizer_dir, "--output-prefix", prefix])
    return prefix


def test_indexed_equals_jsonl(indexed, mixed_chat, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in ("_tokens.bin", "_tokens.idx", "_target_mask.bin", "_target_mask.idx", "_meta.json"):
        assert os.path.isfile(indexed + suffix)
    kwargs = dict(tokenizer=tok, seq_length=256, split="90,10", seed=5)
    from_jsonl = build_sft_datasets(mixed_chat, **kwargs)
    from_indexed = build_sft_datasets(indexed, **kwargs)
    # Megatron-Core's own reader sees one sequence per conversation with exactly the JSONL tokens
    raw = IndexedDataset(indexed + "_tokens")
    docs = from_jsonl[0].documents
    assert len(raw) == len(docs) == 120
    for i in range(len(docs)):
        assert np.array_equal(raw[i], docs.get(i)[0])
    for a, b in zip(from_jsonl, from_indexed):
        assert a.state_fingerprint() == b.state_fingerprint()
        n = a.num_samples(0) + a.num_samples(1)  # two epochs of the training stream
        for g in range(n if a.name == "train" else len(a)):
            sa, sb = a.sample(g), b.sample(g)
            assert all(np.array_equal(sa[k], sb[k]) for k in sa), (a.name, g)
    # the path may also name one of the files
    assert len(build_sft_datasets(indexed + "_tokens.idx", **kwargs)[0]) == len(from_jsonl[0])


def test_indexed_mismatches(indexed, tok, tmp_path):
    with pytest.raises(UserError, match="preprocessed with template 'esft'"):
        build_sft_datasets(indexed, tokenizer=tok, seq_length=256, template="chat_template")
    build_tiny_tokenizer(str(tmp_path / "other"), vocab_size=300)
    with pytest.raises(UserError, match="preprocessed with a different tokenizer"):
        build_sft_datasets(indexed, tokenizer=load_tokenizer(str(tmp_path / "other")), seq_length=256)
    with pytest.raises(UserError, match="no such file"):
        build_sft_datasets(str(tmp_path / "nothing_here"), tokenizer=tok, seq_length=256)
    # a dataset without its meta file (an interrupted copy) is refused
    for suffix in ("_tokens.bin", "_tokens.idx"):
        (tmp_path / f"cut{suffix}").write_bytes(Path(indexed + suffix).read_bytes())
    with pytest.raises(UserError, match="incomplete indexed dataset, cut_meta.json is missing"):
        build_sft_datasets(str(tmp_path / "cut"), tokenizer=tok, seq_length=256)


def test_preprocess_errors_write_nothing(small_chat, tiny_tokenizer_dir, tmp_path, capsys):
    from megatron_esft.errors import run_cli

    main = preprocess_main()
    out = tmp_path / "out"
    out.mkdir()

    def run(*argv):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: main(list(argv)))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
        assert os.listdir(out) == [], "nothing written on error"
        return err

    err = run("--input", small_chat, "--tokenizer", tiny_tokenizer_dir, "--output-prefix", str(out / "x"),
              "--seq-length", "40", "--truncate", "error")
    assert "chat_small.jsonl:" in err and "more than --seq-length 40" in err
    err = run("--input", str(tmp_path / "missing.jsonl"), "--tokenizer", tiny_tokenizer_dir,
              "--output-prefix", str(out / "x"))
    assert "missing.jsonl: no such file" in err
    err = run("--input", small_chat, "--tokenizer", str(tmp_path / "no_tokenizer"), "--output-prefix", str(out / "x"))
    assert "no such tokenizer directory" in err


def test_preprocess_cli_bad_line_subprocess(small_chat, tiny_tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(small_chat, encoding="utf-8").read().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"']),
                   encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--input", str(bad), "--tokenizer", tiny_tokenizer_dir,
         "--output-prefix", str(out / "x")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(rf"error: {re.escape(str(bad))}:4: invalid JSON \(truncated line\?\): [^\n]+ at column \d+\n",
                        proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert os.listdir(out) == []
    # argparse's errors are one line too (no usage dump)
    proc = subprocess.run([sys.executable, str(TOOL), "--input", str(bad)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: preprocess_data.py: the following arguments are required: --tokenizer/--tokenizer-model, "
        "--output-prefix"], proc.stderr
