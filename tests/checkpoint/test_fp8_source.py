"""DeepSeek-V3/R1's released block-wise FP8 checkpoints: dequantized on the way in (DeepSeek's block layout, checked
against a float64 loop and transformers' own FP8 loader), re-quantized on the way out, byte for byte where ESFT did
not train, and the whole pipeline (convert, train, adapter, merge, diff) on such a checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_esft.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_esft.checkpoint.fp8_blocks import FP8_SOURCE_SCALES, BlockFp8Format, scale_name
from megatron_esft.parallel import ParallelConfig
from tests.conftest import REPO, run_tool


def _e4m3(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_dequantize_follows_deepseeks_block_layout():
    """Block (i, j) covers rows i*B.. and columns j*B.. from the top-left, the edge blocks partial (DeepSeek's
    `weight_dequant` kernel); the product is taken in float32."""
    fmt = BlockFp8Format(block=(16, 16))
    q = _e4m3((40, 24))
    scale = torch.rand((3, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64).float() + 0.01
    expected = torch.empty(40, 24, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(16 * i, 16 * (i + 1)), slice(16 * j, 16 * (j + 1))
            expected[rows, cols] = q[rows, cols].double() * scale[i, j].double()
    assert torch.equal(fmt.dequantize(q, scale, torch.float32), expected.float())
    assert torch.equal(fmt.dequantize(q, scale, torch.bfloat16), expected.float().bfloat16())


def test_quantize_is_deepseeks_weight_quant():
    """A fresh scale is the block's amax / 448 (a power of two, rounded up, for ue8m0): the largest value lands on
    +-448 and every value within e4m3's rounding of w / scale; an all-zero block quantizes to zeros."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g).bfloat16()
    w[16:32, :16] = 0
    for scale_fmt in ("float", "ue8m0"):
        fmt = BlockFp8Format(block=(16, 16), scale_fmt=scale_fmt)
        q, s = fmt.quantize(w)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 2)
        amax = torch.stack([torch.stack([w[16 * i:16 * i + 16, 16 * j:16 * j + 16].float().abs().amax()
                                         for j in range(2)]) for i in range(3)])
        if scale_fmt == "float":
            assert torch.equal(s[amax > 0], amax[amax > 0] / 448)
            assert q.float().abs().amax() == 448
        else:
            assert torch.equal(torch.exp2(torch.log2(s).round()), s) and bool((s * 448 >= amax).all())
        assert float(s[1, 0]) == 1.0 and not q[16:32, :16].float().any()
        back = fmt.dequantize(q, s, torch.float32)
        assert ((back - w.float()).abs() <= w.float().abs() / 16 + s.repeat_interleave(16, 0).repeat_interleave(
            16, 1)[:40, :24] * 2**-9).all()  # e4m3: 3 mantissa bits; subnormal spacing 2^-9


def test_requantizing_keeps_the_source_scales_of_unchanged_blocks():
    fmt = BlockFp8Format(block=(16, 16))
    q, s = fmt.quantize(torch.randn(40, 24, generator=torch.Generator().manual_seed(3)).bfloat16())
    w = fmt.dequantize(q, s, torch.bfloat16)
    w[20, 5] = 4 * w[16:32, :16].abs().amax()  # one block "trained", beyond its source scale's range
    q2, s2 = fmt.quantize(w, source_scale=s)
    changed = torch.zeros(3, 2, dtype=torch.bool)
    changed[1, 0] = True
    assert torch.equal(s2[~changed], s[~changed]) and not torch.equal(s2[changed], s[changed])
    same = ~changed.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :24]
    assert torch.equal(q2.view(torch.uint8)[same], q.view(torch.uint8)[same])


@pytest.fixture(scope="module")
def fp8_hf(tiny_hf):
    return tiny_hf("deepseek-v3", fp8_block=16)


def test_the_tiny_fp8_checkpoint_is_what_transformers_loads(tiny_hf):
    """The tiny FP8 writer's layout against transformers' own FP8 loader (which dequantizes on a CPU): equal weights
    in float32. Block 8 divides every tiny dimension; transformers spreads a partial edge block differently
    (models/parity.py), DeepSeek's layout for those is checked against the float64 loop above."""
    import transformers

    hf = tiny_hf("deepseek-v3", fp8_block=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    theirs = model.state_dict()
    raw = load_file(os.path.join(hf, "model.safetensors"))
    fmt = BlockFp8Format(block=(8, 8))
    quantized = [n for n in raw if raw[n].dtype == torch.float8_e4m3fn]
    assert any(".experts." in n for n in quantized) and any("kv_a_proj_with_mqa" in n for n in quantized)
    assert not any(n.endswith(("mlp.gate.weight", "norm.weight")) or "embed" in n or "lm_head" in n
                   for n in quantized)
    for name in quantized:
        if ".experts." in name:
            continue  # transformers fuses the experts into one tensor; the attention and dense/shared MLPs suffice
        ours = fmt.dequantize(raw[name], raw[scale_name(name)], torch.float32)
        assert torch.equal(theirs[name], ours), name


def _bytes(directory):
    return {n: (t.dtype, t.contiguous().view(-1).view(torch.uint8)) for n, t in
            load_file(os.path.join(directory, "model.safetensors")).items()}


def _same(a, b):
    return a[0] == b[0] and torch.equal(a[1], b[1])


def test_hf_to_mcore_to_hf_is_byte_identical_and_leaves_no_scratch(fp8_hf, tmp_path):
    from megatron_esft.errors import UserError

    out = tmp_path / "mcore"
    with pytest.raises(UserError, match="--scratch-dir .*missing: no such directory"):
        hf_to_mcore(fp8_hf, str(out), ParallelConfig(), scratch_dir=str(tmp_path / "missing"))
    (tmp_path / "scratch").mkdir()
    hf_to_mcore(fp8_hf, str(out), ParallelConfig(), scratch_dir=str(tmp_path / "scratch"))
    assert sorted(os.listdir(tmp_path)) == ["mcore", "scratch"] and not os.listdir(tmp_path / "scratch")
    assert os.path.isfile(out / "hf_assets" / FP8_SOURCE_SCALES)
    mcore_to_hf(str(out), str(tmp_path / "back"))
    source, back = _bytes(fp8_hf), _bytes(tmp_path / "back")
    assert set(source) == set(back) and all(_same(source[n], back[n]) for n in source)
    assert FP8_SOURCE_SCALES not in os.listdir(tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [16, 16]

    # checkpoints converted under EP before every rank's dtypes were recorded lack the other ranks' experts: the
    # source scales say which weights were FP8
    meta_path = out / "iter_0000000" / "esft_meta.json"
    complete = meta_path.read_text()
    meta = json.loads(complete)
    meta["hf_dtypes"] = {n: d for n, d in meta["hf_dtypes"].items() if ".experts.5." not in n}
    meta_path.write_text(json.dumps(meta))
    mcore_to_hf(str(out), str(tmp_path / "partial"))
    partial = _bytes(tmp_path / "partial")
    assert set(source) == set(partial) and all(_same(source[n], partial[n]) for n in source)
    meta_path.write_text(complete)

    # without the kept source scales every block gets a fresh amax scale: the e4m3 values come back the same (the
    # source's largest value per block is 448 too), the scales within the bf16 weights' rounding
    os.remove(out / "hf_assets" / FP8_SOURCE_SCALES)
    mcore_to_hf(str(out), str(tmp_path / "fresh"))
    fresh = load_file(os.path.join(tmp_path / "fresh", "model.safetensors"))
    original = load_file(os.path.join(fp8_hf, "model.safetensors"))
    for name, tensor in original.items():
        if name.endswith("_scale_inv"):
            assert torch.allclose(fresh[name], tensor, rtol=2**-8, atol=0), name
        elif tensor.dtype == torch.float8_e4m3fn:
            assert torch.equal(fresh[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_logit_parity_with_transformers(fp8_hf, tmp_path):
    """Stored in float32 the dequantized weights are exact, so our model and transformers' agree to float32 noise."""
    proc = run_tool("convert_hf_to_mcore", "--hf", fp8_hf, "--out", tmp_path / "mcore", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_tool("compare_logits", "--hf", fp8_hf, "--load", tmp_path / "mcore", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rel_l2"] < 1e-5


def test_esft_of_an_fp8_checkpoint_changes_only_the_trained_experts(fp8_hf, tmp_path):
    """Convert, train the selected experts, export: the merged FP8 checkpoint differs from the source in the selected
    experts' weights and scales only, and base + adapter is the same checkpoint."""
    base = tmp_path / "base"
    hf_to_mcore(fp8_hf, str(base), ParallelConfig())
    ecfg = {"experts": {"1": [0, 3], "2": [5]}, "shared_experts": False, "non_expert_modules": False}
    (tmp_path / "ecfg.json").write_text(json.dumps(ecfg))
    data = REPO / "examples" / "tiny" / "data" / "intent_train.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_esft.py"), "--load", str(base), "--save",
                           str(tmp_path / "esft"), "--expert-config", str(tmp_path / "ecfg.json"), "--train-data",
                           str(data), "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--seq-length", "128", "--lr", "1e-2"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_tool("export_esft", "--load", tmp_path / "esft", "--out", tmp_path / "adapter", "--merge-into-hf",
                    fp8_hf, "--merged-out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = load_file(os.path.join(tmp_path / "adapter", "model.safetensors"))
    assert len(adapter) == 18 and all(scale_name(n) in adapter for n in adapter if not n.endswith("_scale_inv"))
    proc = run_tool("convert_mcore_to_hf", "--load", tmp_path / "esft", "--out", tmp_path / "full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, merged = _bytes(tmp_path / "full"), _bytes(tmp_path / "merged")
    assert set(full) == set(merged) and all(_same(full[n], merged[n]) for n in full)
    proc = run_tool("diff_checkpoints", "--base", fp8_hf, "--other", tmp_path / "full", "--expert-config",
                    tmp_path / "ecfg.json", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = json.loads(proc.stdout)
    assert diff["changed_other"] == [] and diff["matches_expert_config"] is True
    assert diff["changed_experts"] == {"1": [0, 3], "2": [5]} and diff["changed"] == 18


def test_bad_fp8_inputs(fp8_hf, tmp_path):
    """One line naming the tensor or config field, exit 2, nothing written."""
    from megatron_esft.checkpoint.safetensors_io import SafetensorsReader
    from safetensors.torch import save_file

    weights = {n: SafetensorsReader(fp8_hf).get(n).clone() for n in SafetensorsReader(fp8_hf).keys()}
    expert = "model.layers.1.mlp.experts.2.up_proj.weight"

    def variant(name, config=None, **changes):
        d = tmp_path / name
        shutil.copytree(fp8_hf, d)
        edited = dict(weights)
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                edited.pop(key)
            else:
                edited[key] = value
        save_file(edited, os.path.join(d, "model.safetensors"))
        if config is not None:
            raw = json.loads((d / "config.json").read_text())
            raw.update(config) if config else raw.pop("quantization_config")
            (d / "config.json").write_text(json.dumps(raw))
        return d

    key = expert.replace(".", "__")
    cases = [
        (variant("no_scale", **{key + "_scale_inv": None}), f"'{expert}' is FP8 but its scales '{expert}_scale_inv' "
                                                             "are missing"),
        (variant("bad_scale", **{key + "_scale_inv": torch.ones(1, 1)}), f"'{expert}_scale_inv' has shape (1, 1); "
                                                                          "blocks of (16, 16) over (32, 64) need (2, 4)"),
        (variant("e5m2", **{key: weights[expert].float().to(torch.float8_e5m2)}), "is float8_e5m2; the config "
                                                                                    "declares e4m3"),
        (variant("int", **{key: weights[expert].float().to(torch.int32)}), f"'{expert}' has dtype int32; a weight "
                                                                            "must be floating point"),
        (variant("no_qc", config={}), "is float8_e4m3fn but config.json has no quantization_config"),
        (variant("gptq", config={"quantization_config": {"quant_method": "gptq"}}),
         "'quantization_config.quant_method' is 'gptq': only DeepSeek's block-wise 'fp8'"),
        (variant("block", config={"quantization_config": {"quant_method": "fp8", "weight_block_size": [16]}}),
         "'quantization_config.weight_block_size' must be two positive integers, got [16]"),
    ]
    for hf, message in cases:
        out = tmp_path / f"out_{hf.name}"
        proc = run_tool("convert_hf_to_mcore", "--hf", hf, "--out", out)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (hf.name, proc.stderr[-2000:])
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".fp8-dequant-")]
