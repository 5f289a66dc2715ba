"""Run under TRITON_INTERPRET=1 (Triton's CPU interpreter; set before the kernels are defined): the quantization
kernels of experts/fp8_triton_quantize.py against their torch references on the CPU, printed as `RESULT {json}` for
tests/experts/test_fp8_triton_quantize.py."""

import json

import torch

from megatron_esft.experts import fp8, fp8_triton_quantize as tq
from megatron_esft.experts.fp8 import quantize_lastdim_reference
from megatron_esft.experts.fp8_swiglu import (
    fp8_swiglu_mlp, swiglu_backward_quantize_keep_reference, swiglu_quantize_reference,
)


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def e4m3_mismatch(a, b):
    """The share of e4m3 values that differ (fp32 math of exp in another order: a rounding tie may flip)."""
    return (a.float() != b.float()).float().mean().item()


def rows_case(t):
    q, s = tq.quantize_rows(t)
    want_q, want_s = quantize_lastdim_reference(t)
    return {"q_equal": bits_equal(q, want_q), "scale_equal": torch.equal(s, want_s), "shape": list(q.shape)}


def every_bf16_value():
    """Every finite bf16 value of magnitude <= 448 (normal and subnormal e4m3 ranges, every rounding tie), in rows
    of 2,048 whose first column is 448: the encode scale is exactly 1, so the kernel converts the values themselves."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits) & (bits.abs() <= 448)]
    width = 2047
    values = torch.cat([values, values.new_zeros(-len(values) % width)]).view(-1, width)
    return torch.cat([values.new_full((values.shape[0], 1), 448.0), values], dim=1)


def weights_case(w):
    """The weights' two layouts through `quantize_lastdim`, as FP8WeightCache quantizes them (the stack itself, and
    its transposed view), and through the cache with the hand-written quantizers selected."""
    out = {}
    for layout, t in (("nk", w), ("kn", w.transpose(-2, -1))):
        q, s = tq.quantize_lastdim(t)
        want_q, want_s = quantize_lastdim_reference(t)
        out[layout] = {"q_equal": bits_equal(q, want_q), "scale_equal": torch.equal(s, want_s),
                       "shape": list(q.shape)}
    fp8.set_fp8_quantizer("triton")
    before = tq.launches
    cache = fp8.FP8WeightCache("none")
    got = [cache.quantize(w, layout, w.device) for layout in ("nk", "kn")]
    fp8.set_fp8_quantizer("inductor")
    want = [cache.quantize(w, layout, w.device) for layout in ("nk", "kn")]
    out["cache"] = {"launches": tq.launches - before, "equal": all(
        bits_equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))}
    return out


def swiglu_forward_case(m, ffn, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(m, 2 * ffn, generator=g) * 3).bfloat16()
    probs = torch.rand(m, 1, generator=g)
    q, s = tq.swiglu_quantize(h, probs)
    want_q, want_s = swiglu_quantize_reference(h, probs)
    return {"mismatch": e4m3_mismatch(q, want_q), "scale_close": torch.allclose(s, want_s, rtol=1e-6, atol=0),
            "shape": list(q.shape)}


def swiglu_backward_case(m, ffn, seed, keep):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(m, 2 * ffn, generator=g) * 3).bfloat16()
    da = torch.randn(m, ffn, generator=g).bfloat16()
    probs = torch.rand(m, 1, generator=g)
    out = tq.swiglu_backward_quantize(da, h, probs, keep=keep)
    want = swiglu_backward_quantize_keep_reference(da, h, probs)
    result = {"outputs": len(out), "mismatch": e4m3_mismatch(out[0], want[0]),
              "scale_close": torch.allclose(out[1], want[1], rtol=1e-6, atol=0),
              "d_probs_close": torch.allclose(out[2], want[2], rtol=1e-5, atol=1e-6), "shape": list(out[0].shape)}
    if keep:
        result["dh_bf16_equal_share"] = (out[3] == want[3]).float().mean().item()
        result["dh_close"] = torch.allclose(out[3].float(), want[3].float(), rtol=2 ** -7, atol=1e-6)
    return result


def mlp_through_the_kernels():
    """fp8_swiglu_mlp forward and backward with the hand-written quantizers against the reference ones: the same
    results up to the SwiGLU kernels' exp rounding, and the kernels really ran."""
    g = torch.Generator().manual_seed(11)
    counts, hidden, ffn = [7, 0, 30, 12], 64, 48
    m = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    inputs = [torch.randn(m, hidden, generator=g).bfloat16(), torch.rand(m, generator=g),
              (torch.randn(len(counts), 2 * ffn, hidden, generator=g) * 0.1).bfloat16(),
              (torch.randn(len(counts), hidden, ffn, generator=g) * 0.1).bfloat16()]
    dy = torch.randn(m, hidden, generator=g).bfloat16()

    def run(quantizer):
        fp8.set_fp8_quantizer(quantizer)
        x, probs, fc1, fc2 = (t.clone().requires_grad_(True) for t in inputs)
        before = tq.launches
        y = fp8_swiglu_mlp(x, probs, fc1, fc2, offs, fp8.FP8WeightCache("none"))
        y.backward(dy)
        fp8.set_fp8_quantizer("inductor")
        return [y, x.grad, probs.grad, fc1.grad, fc2.grad], tq.launches - before

    triton, launches = run("triton")
    reference, no_launches = run("inductor")
    rel = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(triton, reference)]
    return {"launches": launches, "reference_launches": no_launches, "max_rel": max(rel)}


def weights():
    g = torch.Generator().manual_seed(9)
    stack = (torch.randn(4, 150, 130, generator=g) * 0.05).bfloat16()
    stack[2] = 0
    return stack[1:]


def columns_case(rows):
    """quantize_columns over a weight whose columns are `rows` (so every bf16 value goes through its conversion)."""
    w = rows.t().contiguous().unsqueeze(0)  # [1, N = 2048, K = rows]: column k is row k
    q, s = tq.quantize_columns(w)
    want_q, want_s = quantize_lastdim_reference(rows)
    return {"q_equal": bits_equal(q[0], want_q), "scale_equal": torch.equal(s[0], want_s)}


def main():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 2100, generator=g).bfloat16()
    with_zero_row = torch.randn(9, 64, generator=g).bfloat16()
    with_zero_row[4] = 0
    tiny_row = torch.randn(3, 48, generator=g).bfloat16()
    tiny_row[1] *= 1e-30  # an encode scale near the top of fp32's range; e4m3 subnormals after scaling
    results = {
        "rows": rows_case(torch.randn(37, 64, generator=g).bfloat16() * 5),
        "rows of 2,100 columns (4,096-column blocks)": rows_case(wide),
        "rows of a wider tensor (row stride 2,100)": rows_case(wide[:, :1000]),
        "a zero row, a tiny row": [rows_case(with_zero_row), rows_case(tiny_row)],
        "every bf16 value <= 448": rows_case(every_bf16_value()),
        # N = 150, K = 130: two row tiles of 128 and five column blocks of 32, both partial; one expert of zeros;
        # the experts 1..3 of a stack of 4 (an offset start)
        "weights": weights_case(weights()),
        "every bf16 value <= 448, as columns": columns_case(every_bf16_value()),
        "SwiGLU forward": [swiglu_forward_case(29, 48, 1), swiglu_forward_case(5, 1408, 2)],
        "SwiGLU backward": [swiglu_backward_case(29, 48, 3, False), swiglu_backward_case(5, 1408, 4, True),
                            swiglu_backward_case(17, 40, 5, True)],
        "fused MLP": mlp_through_the_kernels(),
    }
    x = torch.randn(8, 64, generator=g).bfloat16()
    h, probs = torch.randn(8, 96, generator=g).bfloat16(), torch.rand(8, 1, generator=g)
    results["not used"] = {
        "float32 rows": tq.quantize_rows(x.float()) is not None,
        "column-strided rows": tq.quantize_rows(x.t()) is not None,
        "3-D rows": tq.quantize_rows(x.view(2, 4, 64)) is not None,
        "3-D rows with a gap (neither contiguous nor transposed)": tq.quantize_lastdim(
            torch.zeros(2, 8, 64).bfloat16()[:, ::2]) is not None,
        "float32 weights": tq.quantize_columns(torch.zeros(2, 16, 32)) is not None,
        "rows wider than MAX_BLOCK": tq.quantize_rows(torch.zeros(2, tq.MAX_BLOCK + 16).bfloat16()) is not None,
        "bf16 probabilities": tq.swiglu_quantize(h, probs.bfloat16()) is not None,
        "probabilities of other rows": tq.swiglu_quantize(h, probs[:4]) is not None,
        "da of another width": tq.swiglu_backward_quantize(x, h, probs) is not None,
    }
    empty = tq.quantize_rows(x[:0])
    results["no rows"] = [list(t.shape) for t in empty]
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
