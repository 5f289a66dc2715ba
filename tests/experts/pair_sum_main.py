"""Run under TRITON_INTERPRET=1 (Triton's CPU interpreter; set before the kernel is defined): the pair-sum kernel of
experts/pair_sum.py against torch on the CPU, printed as `RESULT {json}` for tests/experts/test_pair_sum.py."""

import json

import torch
import torch.nn.functional as F

from megatron_esft.experts import pair_sum
from megatron_esft.experts.permutation import sum_pairs


def sequential_fp32(rows, row_of_pair, topk):
    """sum over j in ascending order in fp32 (embedding_bag's loop), [T, H] fp32 before the final rounding."""
    picked = rows.float()[row_of_pair.long()].view(-1, topk, rows.shape[1])
    acc = picked[:, 0].clone()
    for j in range(1, topk):
        acc += picked[:, j]
    return acc


def truncated_bf16(x):
    """fp32 -> bf16 by dropping the low 16 bits: the interpreter's conversion (a GPU rounds to nearest even)."""
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def case(tokens, topk, columns, dtype, index_dtype=torch.int64, wider=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens * topk, columns + wider, generator=g).to(dtype)
    rows = base[:, :columns]  # a view whose rows are `columns + wider` apart
    row_of_pair = torch.randperm(tokens * topk, generator=g).to(index_dtype)
    assert pair_sum.usable(rows, row_of_pair, topk)
    out = pair_sum.pair_sum(rows, row_of_pair, topk)
    want = sequential_fp32(rows, row_of_pair, topk)
    want = truncated_bf16(want) if dtype == torch.bfloat16 else want.to(dtype)
    bag = F.embedding_bag(row_of_pair.long(), rows.contiguous(), torch.arange(0, tokens * topk, topk), mode="sum")
    return {"shape": list(out.shape), "dtype": str(out.dtype), "equal_sequential": torch.equal(out, want),
            "equal_embedding_bag": torch.equal(out, bag)}


def main():
    results = {
        "fp32": case(37, 6, 200, torch.float32),
        "fp16": case(19, 4, 96, torch.float16, seed=1),
        "bf16": case(23, 6, 130, torch.bfloat16, seed=2),
        "two column blocks, int32 indices, strided rows": case(9, 3, 1500, torch.float32, torch.int32, wider=20),
    }
    g = torch.Generator().manual_seed(3)
    rows, row_of_pair = torch.randn(40, 64, generator=g), torch.randperm(40, generator=g)
    results["not used"] = {
        "top-1": pair_sum.usable(rows, row_of_pair, 1),
        "column-strided rows": pair_sum.usable(rows.t(), row_of_pair, 4),
        "float64": pair_sum.usable(rows.double(), row_of_pair, 4),
        "1-D rows": pair_sum.usable(rows[:, 0], row_of_pair, 4),
    }
    # the permutation's sum_pairs goes through the kernel here (the same sums as embedding_bag in fp32)
    calls = []
    original = pair_sum.pair_sum
    pair_sum.pair_sum = lambda *a: calls.append(1) or original(*a)
    via = sum_pairs(rows, row_of_pair, 4)
    pair_sum.pair_sum = original
    results["sum_pairs"] = {"calls": len(calls), "equal_embedding_bag": torch.equal(
        via, F.embedding_bag(row_of_pair, rows, torch.arange(0, 40, 4), mode="sum"))}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
