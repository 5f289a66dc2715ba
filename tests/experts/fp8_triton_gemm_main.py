"""Run under TRITON_INTERPRET=1 (Triton's CPU interpreter; set before the kernel is defined): the Triton FP8 grouped
GEMM of experts/fp8_triton_gemm.py against float64 and against the float32 emulation of torch's kernel, alone and as
the FP8 experts' GEMM (fp8.set_fp8_gemm_kernel("triton")), printed as `RESULT {json}` for
tests/experts/test_fp8_triton_gemm.py."""

import json

import torch

from megatron_esft.experts import fp8, fp8_triton_gemm
from megatron_esft.experts.fp8_swiglu import fp8_swiglu_mlp

BF16_TRUNCATION = 2.0 ** -7  # the interpreter truncates fp32 -> bf16: relative error below one bf16 ulp (2^-7)


def operands(counts, k, n, extra_rows=0, seed=0, stacked=0):
    """e4m3 rows [M, K] (M = sum(counts) + extra_rows), weights in the experts' layout (a [G, K, N] view of
    [G, N, K]), decode scales spanning several binades, offs."""
    g = torch.Generator().manual_seed(seed)
    m = sum(counts) + extra_rows
    a_q = (torch.randn(m, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_q = (torch.randn(len(counts) + stacked, n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_q = w_q[stacked // 2:stacked // 2 + len(counts)]  # groups of a larger stack when stacked > 0
    scale_a = torch.rand(m, generator=g) * 2.0 ** torch.randint(-12, -4, (m,), generator=g)
    scale_b = torch.rand(len(counts), n, generator=g) * 2.0 ** -8
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return a_q, w_q.transpose(-2, -1), scale_a, scale_b, offs


def float64_reference(a_q, b_q_t, scale_a, scale_b, offs):
    out = torch.zeros(a_q.shape[0], b_q_t.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = (a_q[start:end].double() @ b_q_t[g].double()) * scale_a[start:end, None].double() \
            * scale_b[g].double()
        start = end
    return out


def gemm_case(counts, k, n, extra_rows=0, seed=0, stacked=0, config=None):
    args = operands(counts, k, n, extra_rows, seed, stacked)
    assert fp8_triton_gemm.usable(args[0])
    fp8._check_kernel_contract(*args)  # the operands torch's kernel accepts
    out = fp8_triton_gemm.scaled_grouped_mm(*args, config=config)
    rows = int(args[4][-1]) if len(counts) else 0
    ref = float64_reference(*args)[:rows]
    got = out[:rows].double()
    emulated = fp8._emulated_scaled_grouped_mm(*args)[:rows].double()
    bound = BF16_TRUNCATION * ref.abs() + 1e-30
    return {"shape": list(out.shape), "dtype": str(out.dtype),
            "within_truncation_of_float64": bool(((got - ref).abs() <= bound * (1 + 1e-6)).all()),
            "truncated_toward_zero": bool((got.abs() <= ref.abs() * (1 + 2.0 ** -20)).all()),
            "max_rel_vs_emulation": ((got - emulated).abs() / emulated.abs().clamp_min(1e-30)).max().item()
            if rows else 0.0}


def mlp_case():
    """The fused FP8 expert MLP, forward + backward, through the Triton kernel and through the emulation."""
    g = torch.Generator().manual_seed(5)
    counts, h, ffn = [7, 0, 37, 20], 64, 48
    m = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    inputs = (torch.randn(m, h, generator=g).bfloat16(), torch.rand(m, generator=g),
              (torch.randn(len(counts), 2 * ffn, h, generator=g) * 0.1).bfloat16(),
              (torch.randn(len(counts), h, ffn, generator=g) * 0.1).bfloat16())
    dy = torch.randn(m, h, generator=g).bfloat16()
    results = {}
    for kernel in ("torch", "triton"):
        fp8.set_fp8_gemm_kernel(kernel)
        x, probs, fc1, fc2 = (t.clone().requires_grad_(True) for t in inputs)
        calls = []
        original = fp8_triton_gemm.scaled_grouped_mm
        fp8_triton_gemm.scaled_grouped_mm = lambda *a: calls.append(1) or original(*a)
        try:
            y = fp8_swiglu_mlp(x, probs, fc1, fc2, offs, fp8.FP8WeightCache("none"))
            y.backward(dy)
        finally:
            fp8_triton_gemm.scaled_grouped_mm = original
            fp8.set_fp8_gemm_kernel("torch")
        results[kernel] = {"calls": len(calls), "tensors": [y, x.grad, probs.grad, fc1.grad, fc2.grad]}

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {"triton_calls": results["triton"]["calls"], "torch_calls": results["torch"]["calls"],
            "rel": [rel(a, b) for a, b in zip(results["triton"]["tensors"], results["torch"]["tensors"])]}


def pinned_case():
    """fp8_triton_gemm.pin_config: every launch runs that candidate (bit-identical to launching it explicitly)."""
    args = operands([30, 0, 41], 160, 80, seed=10)
    config = fp8_triton_gemm.candidates()["TMA 64x64x128 w4 s4"]
    launched = []  # the candidate each launch ran (the real launch: only recorded on the way)
    real_launch = fp8_triton_gemm._launch
    fp8_triton_gemm._launch = lambda *a: launched.append(a[-1] and fp8_triton_gemm.config_label(a[-1])) \
        or real_launch(*a)
    explicit = fp8_triton_gemm.scaled_grouped_mm(*args, config=config)
    default = fp8_triton_gemm.scaled_grouped_mm(*args)  # the interpreter's 16x32x32 tiles
    fp8_triton_gemm.pin_config("TMA 64x64x128 w4 s4")
    pinned = fp8_triton_gemm.scaled_grouped_mm(*args)
    fp8_triton_gemm.pin_config(None)
    unpinned = fp8_triton_gemm.scaled_grouped_mm(*args)
    fp8_triton_gemm._launch = real_launch
    try:
        fp8_triton_gemm.pin_config("TMA 64x64x128")
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"pinned_equals_explicit": torch.equal(pinned, explicit), "unpinned_equals_default": torch.equal(
        unpinned, default), "launched": launched, "error": error}


def tma_failing_case():
    """The TMA candidates fail (their descriptors cannot be set up): the pointer candidates go on."""
    import warnings

    real = fp8_triton_gemm._set_descriptor_blocks

    def no_tma(nargs):
        if nargs["TMA"]:
            raise RuntimeError("no TMA today")
        real(nargs)

    fp8_triton_gemm._set_descriptor_blocks = no_tma
    fp8_triton_gemm.INTERPRETER_CONFIG["TMA"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case = gemm_case([9, 30], 48, 32, seed=8)
        case["calls"] = 1 + (fp8_triton_gemm.scaled_grouped_mm(*operands([9, 30], 48, 32, seed=8)) is not None)
    fp8_triton_gemm._set_descriptor_blocks = real
    messages = [str(w.message).split("GEMM's ", 1)[-1] for w in caught if "Triton FP8" in str(w.message)]
    return {"warnings": messages, "case": case, "usable": fp8_triton_gemm.usable(torch.zeros(1)),
            "tma": fp8_triton_gemm._tma}


def main():
    results = {}
    # tiles loaded by pointer, through TMA descriptors, and by a persistent grid (3 programs striding over the tiles)
    for tma, persistent in ((False, False), (True, False), (True, True)):
        fp8_triton_gemm.INTERPRETER_CONFIG.update(TMA=tma, PERSISTENT=persistent)
        suffix = " (persistent TMA)" if persistent else " (TMA)" if tma else ""
        results.update({name + suffix: case for name, case in {
            "three column tiles, two K steps, empty and 1-row groups": gemm_case([0, 5, 17, 33, 0, 1], 64, 80),
            "K not a multiple of the K tile": gemm_case([9, 30], 48, 32, seed=1),
            "rows after the last group": gemm_case([16, 3], 32, 16, extra_rows=7, seed=2),
            "one group over many row tiles": gemm_case([70], 32, 48, seed=3),
            "all groups empty": gemm_case([0, 0], 32, 16, extra_rows=5, seed=4),
            "weights a slice of a larger stack": gemm_case([11, 6, 20], 48, 32, seed=6, stacked=5),
        }.items()})
    fp8_triton_gemm.INTERPRETER_CONFIG.update(TMA=False, PERSISTENT=False)
    # G not a power of two (the group lookup's vector is padded to 128), many empty groups, up to 2 tiles each
    results["100 groups"] = gemm_case([(7 * g) % 23 if g % 5 == 1 else 0 for g in range(100)], 32, 16, seed=9)
    for label, config in fp8_triton_gemm.candidates().items():  # a GPU candidate's own tiles, chosen explicitly
        if config.kwargs["BM"] == 64 and config.kwargs["BN"] <= 128:
            results["candidate " + label] = gemm_case([70, 0, 90], 160, 80, seed=7, config=config)
    results["pinned candidate"] = pinned_case()
    results["fused FP8 MLP"] = mlp_case()
    results["TMA candidates failing"] = tma_failing_case()
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
