"""The Triton FP8 grouped GEMM (experts/fp8_triton_gemm.py), the second kernel behind the FP8 experts: on the CPU
under Triton's interpreter (a subprocess: the interpreter is chosen when the kernel is defined) against float64 and
the emulation of torch's kernel, alone and inside the fused FP8 expert MLP; a kernel that fails to build falls back
with one warning; on a Hopper GPU, against torch._scaled_grouped_mm."""

import warnings

import pytest
import torch
from interpreter import break_kernel, run_under_interpreter

from megatron_esft.experts import fp8, fp8_triton_gemm
from megatron_esft.experts.fp8 import quantize_lastdim_reference, scaled_grouped_mm_supported


def test_kernel_matches_float64_under_the_interpreter():
    result = run_under_interpreter("fp8_triton_gemm_main.py")
    mlp = result.pop("fused FP8 MLP")
    # TMA needs the most from the driver and from Triton: if its candidates fail, the kernel goes on without them
    # (one warning) instead of falling back to torch's
    fallback = result.pop("TMA candidates failing")
    # a pinned candidate runs every launch, as when launched explicitly, and unpinning brings the default back
    pinned = result.pop("pinned candidate")
    assert pinned["launched"] == ["TMA 64x64x128 w4 s4", None, "TMA 64x64x128 w4 s4", None], pinned
    assert pinned["pinned_equals_explicit"] and pinned["unpinned_equals_default"], pinned
    assert pinned["error"].startswith("Triton FP8 GEMM candidate 'TMA 64x64x128': choose from 'pointer 128x128x128"), \
        pinned
    assert fallback["warnings"] == ["TMA candidates failed (RuntimeError: no TMA today); its pointer candidates alone "
                                    "from now on"] and fallback["usable"] and not fallback["tma"], fallback
    assert fallback["case"]["within_truncation_of_float64"] and fallback["case"]["calls"] == 2, fallback
    for name, case in result.items():
        # fp32 accumulation of exact e4m3 products, the scales applied once, then the interpreter's truncation
        assert case["within_truncation_of_float64"] and case["truncated_toward_zero"], (name, case)
        assert case["dtype"] == "torch.bfloat16", (name, case)
        # against torch's kernel as emulated (rounded to nearest): one bf16 step at most
        assert case["max_rel_vs_emulation"] <= 2.0 ** -7 + 1e-6, (name, case)
    assert result["three column tiles, two K steps, empty and 1-row groups"]["shape"] == [56, 80]
    assert result["rows after the last group"]["shape"] == [26, 16]
    assert len(result) == 3 * 6 + 1 + 5, sorted(result)
    assert {"candidate TMA 64x64x128 w4 s4", "candidate pointer 64x128x128 w4 s4",
            "candidate persistent TMA 64x128x128 w4 s4"} <= set(result), sorted(result)
    # forward (fc1, fc2) and input gradient (fc2, fc1) through the Triton kernel; wgrad stays bf16
    assert mlp["triton_calls"] == 4 and mlp["torch_calls"] == 0, mlp
    # output, d(input), d(probs), d(fc1), d(fc2): differences from the bf16 truncation flipping e4m3 roundings only
    assert max(mlp["rel"]) < 0.05, mlp


@pytest.mark.timeout(300)
def test_every_autotuned_config_compiles_for_hopper_to_pipelined_fp8_tensor_core_code():
    """What the kernel's speed rests on, checked without a GPU for each autotuning candidate at V2-Lite's K: FP8
    wgmma instructions, tile loads pipelined through shared memory (cp.async, or TMA bulk copies for the TMA
    candidates), no register spills, and shared memory within an H100's 227 KiB. (A K stride unknown at compile
    time made every config spill and lose its pipelining.)"""
    import triton

    from megatron_esft.experts.triton_aot import MAX_SHARED_BYTES

    pytest.importorskip("triton.backends.nvidia")
    for config in fp8_triton_gemm._configs(triton):
        for k in (2048, 1408):
            compiled = fp8_triton_gemm.compile_ahead_of_time(config, k)
            label = (config.kwargs, config.num_warps, config.num_stages, k)
            assert compiled.fp8_mma > 0, label
            assert compiled.pipelined_loads > 0, label
            # the TMA candidates' tile loads are bulk tensor copies, the others' cp.async of 16-byte vectors
            assert (compiled.tma_loads > 0) == config.kwargs["TMA"], (label, compiled.tma_loads)
            assert compiled.spill_bytes == 0 and 0 < compiled.registers <= 255, (label, compiled.registers)
            assert 0 < compiled.shared_bytes <= MAX_SHARED_BYTES[90], (label, compiled.shared_bytes)


def test_the_kernel_choice_is_checked():
    with pytest.raises(ValueError, match="choose from torch, triton"):
        fp8.set_fp8_gemm_kernel("cutlass")
    assert fp8.fp8_gemm_kernel() == "torch"


def _small_operands():
    g = torch.Generator().manual_seed(0)
    x_q, x_s = quantize_lastdim_reference(torch.randn(20, 32, generator=g).bfloat16())
    w_q, w_s = quantize_lastdim_reference(torch.randn(2, 16, 32, generator=g).bfloat16())
    offs = torch.tensor([8, 20], dtype=torch.int32)
    return x_q, w_q.transpose(-2, -1), x_s, w_s, offs


def _gemm_messages(caught):
    return [str(w.message) for w in caught if "Triton FP8 grouped GEMM" in str(w.message)]


def test_a_kernel_that_fails_falls_back_to_torch_once(monkeypatch):
    break_kernel(monkeypatch, fp8_triton_gemm)
    monkeypatch.setattr(fp8_triton_gemm, "_tma", True)
    args = _small_operands()
    fp8.set_fp8_gemm_kernel("triton")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = fp8._scaled_mm(*args)
            second = fp8._scaled_mm(*args)
    finally:
        fp8.set_fp8_gemm_kernel("torch")
    # first without the TMA candidates, then for good
    messages = _gemm_messages(caught)
    assert len(messages) == 2 and "TMA candidates failed" in messages[0] and "use torch" in messages[1], messages
    assert all("no kernel today" in m for m in messages), messages
    assert torch.equal(first, fp8._emulated_scaled_grouped_mm(*args)) and torch.equal(first, second)


@pytest.mark.skipif(not (torch.cuda.is_available() and scaled_grouped_mm_supported(torch.device("cuda"))),
                    reason="compared with torch._scaled_grouped_mm, which needs a CUDA sm90/sm100 GPU")
def test_cuda_triton_kernel_matches_torch_kernel():
    """The V2-Lite expert shapes (forward of fc1 and the input gradient of fc2's layout), empty groups included: the
    autotuned choice and every candidate (tiles by pointer and by TMA)."""
    import triton

    counts = [5, 0, 130, 61, 0, 389]
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    for k, n in ((2048, 2816), (1408, 2048)):
        x_q, x_s = fp8.quantize_lastdim((torch.randn(sum(counts), k, generator=g)).bfloat16().cuda())
        w_q, w_s = fp8.quantize_lastdim((torch.randn(len(counts), n, k, generator=g) * 0.05).bfloat16().cuda())
        args = (x_q, w_q.transpose(-2, -1), x_s, w_s, offs)
        theirs = torch._scaled_grouped_mm(*args[:4], offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True)
        for config in [None, *fp8_triton_gemm._configs(triton)]:
            ours = fp8_triton_gemm.scaled_grouped_mm(*args, config=config)
            assert ours is not None and not fp8_triton_gemm._failed, config
            rel = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
            assert rel < 1e-2, (k, n, config and fp8_triton_gemm.config_label(config), rel)
            if config is None:  # the autotuner chose one of the candidates
                assert fp8_triton_gemm.autotuned_config() is not None
        # nothing in the kernel synchronizes with the host (a CUDA graph can hold it)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fp8_triton_gemm.scaled_grouped_mm(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
