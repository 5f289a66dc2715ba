"""The hand-written Triton quantizers of the FP8 experts (experts/fp8_triton_quantize.py): on the CPU under Triton's
interpreter (a subprocess) against their torch references, bit for bit where the math has no exp (every bf16 value
<= 448 through the e4m3 conversion, zero and tiny rows, strided rows), and inside the fused FP8 MLP; compiled for
Hopper and Blackwell without a GPU (no spills, 16-byte loads, the hardware's e4m3 conversion, IEEE reciprocals); a
kernel that fails to build falls back to the compiled quantizers with one warning; on a GPU, against the eager
references."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from interpreter import break_kernel, run_under_interpreter

from megatron_esft.experts import fp8, fp8_triton_quantize
from megatron_esft.experts.fp8 import quantize_lastdim, quantize_lastdim_reference
from megatron_esft.experts.fp8_swiglu import (
    swiglu_backward_quantize_keep_reference, swiglu_backward_quantize_reference, swiglu_quantize_reference,
)
from tests.conftest import REPO

E4M3_TIES = 1e-3  # share of e4m3 values an exp rounded in another last bit may flip (the compiled kernels' bound too)


def test_kernels_match_their_references_under_the_interpreter():
    result = run_under_interpreter("fp8_triton_quantize_main.py")
    for name in ("rows", "rows of 2,100 columns (4,096-column blocks)", "rows of a wider tensor (row stride 2,100)",
                 "every bf16 value <= 448"):
        assert result[name]["q_equal"] and result[name]["scale_equal"], (name, result[name])
    assert all(case["q_equal"] and case["scale_equal"] for case in result["a zero row, a tiny row"]), result
    assert result["every bf16 value <= 448"]["shape"] == [17, 2048]
    # the weights' two layouts (rows of the stack; its columns: the transposed, input-gradient layout), bit for bit,
    # also through FP8WeightCache with the hand-written quantizers selected (two launches: one per layout)
    weights = result["weights"]
    for layout, shape in (("nk", [3, 150, 130]), ("kn", [3, 130, 150])):
        assert weights[layout] == {"q_equal": True, "scale_equal": True, "shape": shape}, weights
    assert weights["cache"] == {"launches": 2, "equal": True}, weights
    assert result["every bf16 value <= 448, as columns"] == {"q_equal": True, "scale_equal": True}
    for case in result["SwiGLU forward"] + result["SwiGLU backward"]:
        assert case["mismatch"] < E4M3_TIES and case["scale_close"], case
    backward = result["SwiGLU backward"]
    assert [case["outputs"] for case in backward] == [3, 4, 4] and backward[1]["shape"] == [5, 2816]
    assert all(case["d_probs_close"] for case in backward), backward
    assert all(case["dh_close"] and case["dh_bf16_equal_share"] > 0.99 for case in backward[1:]), backward
    # x, the activation, the output gradient and dh of fp8_swiglu_mlp went through the kernels, and the weights in
    # both layouts (no cache), with the results of the reference quantizers (d_probs sums in another order)
    assert result["fused MLP"]["launches"] == 8 and result["fused MLP"]["reference_launches"] == 0, result
    assert result["fused MLP"]["max_rel"] < 1e-5, result["fused MLP"]
    assert not any(result["not used"].values()), result["not used"]
    assert result["no rows"] == [[0, 64], [0]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("capability", [90, 100])
def test_kernels_compile_for_the_gpu_without_spills(capability):
    """At DeepSeek-V2-Lite's widths (hidden 2,048, expert FFN 1,408; the weights' N of 2,816 and 2,048 for the
    column kernel) and V3's hidden 7,168: no spills, 16-byte vector loads, the e4m3 conversion in hardware
    (`cvt.rn.satfinite.e4m3x2.f32`, round to nearest even as torch's), and the reciprocals IEEE-rounded
    (`div.rn.f32`), as torch's eager ops."""
    pytest.importorskip("triton.backends.nvidia")
    for kernel, columns, constexprs in (("quantize_rows_kernel", 2048, {}), ("quantize_rows_kernel", 7168, {}),
                                        ("quantize_columns_kernel", 2816, {}), ("quantize_columns_kernel", 2048, {}),
                                        ("swiglu_quantize_kernel", 1408, {}),
                                        ("swiglu_backward_quantize_kernel", 1408, {"KEEP": False}),
                                        ("swiglu_backward_quantize_kernel", 1408, {"KEEP": True})):
        compiled = fp8_triton_quantize.compile_ahead_of_time(kernel, columns, capability, **constexprs)
        label = (kernel, columns, constexprs)
        assert compiled.spill_bytes == 0 and 0 < compiled.registers <= 128, (label, compiled.registers)
        assert compiled.count("ld.global.v4.b32") > 0, label
        assert compiled.count("cvt.rn.satfinite.e4m3x2.f32") > 0, label
        # two per row; the column kernel's threads hold several columns' scales
        assert compiled.count("div.rn.f32") == 2 or kernel == "quantize_columns_kernel", label
        assert compiled.count("div.rn.f32") > 0, label
        assert compiled.count("st.global.v4.b16") + compiled.count("st.global.v4.b32") > 0 or not constexprs.get(
            "KEEP"), label


def test_compiling_ahead_of_time_refuses_a_process_that_imported_triton_interpreted():
    """Triton's own helpers (tl.max's combine function) are the interpreter's in such a process: compiling there
    would fail, or pass only on a kernel found in Triton's cache."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    code = ("from megatron_esft.experts import fp8_triton_quantize as q; "
            "q.compile_ahead_of_time('quantize_rows_kernel', 64)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "Triton was imported under TRITON_INTERPRET=1 in this process" in proc.stderr.splitlines()[-1]


def test_launch_settings_hold_whole_rows():
    assert fp8_triton_quantize.launch_settings(2048) == (2048, 1, 8)
    assert fp8_triton_quantize.launch_settings(1408) == (2048, 1, 8)
    assert fp8_triton_quantize.launch_settings(7168) == (8192, 1, 16)
    assert fp8_triton_quantize.launch_settings(48) == (64, 16, 4)
    assert fp8_triton_quantize.launch_settings(fp8_triton_quantize.MAX_BLOCK + 1) is None


def test_the_quantizer_choice_is_checked():
    with pytest.raises(ValueError, match="choose from inductor, triton"):
        fp8.set_fp8_quantizer("cuda")
    assert fp8.fp8_quantizer() == "inductor"


def test_a_kernel_that_fails_falls_back_to_the_compiled_quantizers_once(monkeypatch):
    break_kernel(monkeypatch, fp8_triton_quantize)
    monkeypatch.setattr(fp8, "_quantizer", "triton")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 32, generator=g).bfloat16()
    h, da, probs = torch.randn(10, 64, generator=g).bfloat16(), x, torch.rand(10, 1, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [quantize_lastdim(x), quantize_lastdim(x)]
        from megatron_esft.experts.fp8_swiglu import swiglu_backward_quantize, swiglu_quantize
        swiglu = [swiglu_quantize(h, probs), swiglu_backward_quantize(da, h, probs)]
    for q, s in outs:
        want_q, want_s = quantize_lastdim_reference(x)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert torch.equal(swiglu[0][1], swiglu_quantize_reference(h, probs)[1])
    assert torch.equal(swiglu[1][2], swiglu_backward_quantize_reference(da, h, probs)[2])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no kernel today" in messages[0] and "torch.compile'd quantizers" in messages[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels: CUDA only")
def test_cuda_kernels_against_the_eager_references():
    """V2-Lite's widths on the GPU: the token and weight quantizers bit for bit (no exp), the SwiGLU kernels within
    e4m3 ties (the GPU's exp and division are approximate) and the bf16 dh within one bf16 step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, 2048, generator=g, device="cuda").bfloat16()
    q, s = fp8_triton_quantize.quantize_rows(x)
    want_q, want_s = quantize_lastdim_reference(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    h = (torch.randn(3001, 2816, generator=g, device="cuda") * 3).bfloat16()
    da = torch.randn(3001, 1408, generator=g, device="cuda").bfloat16()
    probs = torch.rand(3001, 1, generator=g, device="cuda")
    q, s = fp8_triton_quantize.swiglu_quantize(h, probs)
    want_q, want_s = swiglu_quantize_reference(h, probs)
    assert (q.float() != want_q.float()).float().mean() < E4M3_TIES
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    got = fp8_triton_quantize.swiglu_backward_quantize(da, h, probs, keep=True)
    want = swiglu_backward_quantize_keep_reference(da, h, probs)
    assert (got[0].float() != want[0].float()).float().mean() < E4M3_TIES
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[3].float(), want[3].float(), rtol=2 ** -7, atol=1e-5)
    # six trained experts' fc1 weights in both layouts, bit for bit (no exp)
    w = (torch.randn(6, 2816, 2048, generator=g, device="cuda") * 0.02).bfloat16()
    for t in (w, w.transpose(-2, -1)):
        q, s = fp8_triton_quantize.quantize_lastdim(t)
        want_q, want_s = quantize_lastdim_reference(t)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
