import pytest

from tests.conftest import run_tool


def test_tiny_checkpoint_loads_offline_in_transformers(tiny_hf):
    transformers = pytest.importorskip("transformers")
    path = tiny_hf("deepseek-v2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tokenizer) <= model.config.vocab_size
    ids = tokenizer("User: 你好 {\"intent\": 1}")["input_ids"]
    assert max(ids) < model.config.vocab_size
    names = [n for n, _ in model.named_parameters()]
    assert any("mlp.experts" in n for n in names)


def test_tiny_tool_rejects_bad_sizes(tmp_path):
    proc = run_tool("make_tiny_deepseek", "--arch", "deepseek-v3", "--out", tmp_path / "x", "--topk", "9")
    assert proc.returncode == 2 and "exceeds --experts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
