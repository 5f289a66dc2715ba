"""The Triton pair-sum kernel (experts/pair_sum.py) behind permutation.sum_pairs on a GPU: on the CPU under Triton's
interpreter (a subprocess: the interpreter is chosen when the kernel is defined) the same sums as a sequential fp32
loop (embedding_bag's order) and as embedding_bag, where it applies; a kernel that fails to build falls back to
embedding_bag with one warning; on a GPU, bit for bit the sequential sum rounded once."""

import warnings

import pytest
import torch
from interpreter import break_kernel, run_under_interpreter
import torch.nn.functional as F

from megatron_esft.experts import pair_sum
from megatron_esft.experts.permutation import sum_pairs


def test_kernel_sums_like_a_sequential_fp32_loop_under_the_interpreter():
    result = run_under_interpreter("pair_sum_main.py")
    for name in ("fp32", "fp16", "bf16", "two column blocks, int32 indices, strided rows"):
        assert result[name]["equal_sequential"], (name, result[name])
    # embedding_bag's own CPU kernel sums bf16 differently, and the interpreter truncates to bf16 (a GPU rounds)
    for name in ("fp32", "fp16", "two column blocks, int32 indices, strided rows"):
        assert result[name]["equal_embedding_bag"], (name, result[name])
    assert result["two column blocks, int32 indices, strided rows"]["shape"] == [9, 1500]
    assert not any(result["not used"].values()), result["not used"]
    assert result["sum_pairs"] == {"calls": 1, "equal_embedding_bag": True}


def test_a_kernel_that_fails_falls_back_to_embedding_bag_once(monkeypatch):
    break_kernel(monkeypatch, pair_sum)
    rows, row_of_pair = torch.randn(12, 8), torch.randperm(12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sum_pairs(rows, row_of_pair, 3)
        again = sum_pairs(rows, row_of_pair, 3)
    want = F.embedding_bag(row_of_pair, rows, torch.arange(0, 12, 3), mode="sum")
    assert torch.equal(out, want) and torch.equal(again, want)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no kernel today" in messages[0] and "embedding_bag" in messages[0]
    assert not pair_sum.usable(rows, row_of_pair, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel: CUDA only")
def test_cuda_pair_sum_is_the_sequential_sum_rounded_once():
    """V2-Lite's un-permutation at seq 4096: 4,096 tokens x 6 rows of 2,048 bf16; also a ragged column count."""
    for tokens, topk, columns, dtype in ((4096, 6, 2048, torch.bfloat16), (300, 4, 1000, torch.float32)):
        g = torch.Generator(device="cuda").manual_seed(0)
        rows = torch.randn(tokens * topk, columns, generator=g, device="cuda").to(dtype)
        row_of_pair = torch.randperm(tokens * topk, generator=g, device="cuda")
        assert pair_sum.usable(rows, row_of_pair, topk)
        out = pair_sum.pair_sum(rows, row_of_pair, topk)
        picked = rows.float()[row_of_pair].view(tokens, topk, columns)
        acc = picked[:, 0].clone()
        for j in range(1, topk):
            acc += picked[:, j]
        assert torch.equal(out, acc.to(dtype))
        bag = F.embedding_bag(row_of_pair, rows, torch.arange(0, tokens * topk, topk, device="cuda"), mode="sum")
        torch.testing.assert_close(out, bag, rtol=2**-7, atol=0)  # expected bit-identical (the same loop order)
        assert torch.equal(sum_pairs(rows, row_of_pair, topk), out)
