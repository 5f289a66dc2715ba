"""The Triton kernel of experts/fp8_triton_gemm.py (which documents it, chooses its configs and launches it). Kept
in a module of its own, imported only where Triton is: Triton decides between compiling and interpreting
(TRITON_INTERPRET=1) when a kernel is defined, so fp8_triton_gemm.py loads this file afresh when it needs the
other kind (`load`)."""

import triton
import triton.language as tl

from megatron_esft.experts.triton_support import fresh_module


@triton.jit
def _tile(tile, column_tiles, gs, ends, starts, tiles, tiles_through, a, b, a_desc, b_desc, out, scale_a, scale_b,
          N, stride_am, stride_bg, stride_bn, stride_sg, stride_om, K: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """Output tile number `tile` (row tile major; row tiles numbered in group order, `tiles_through` their running
    count per group), e4m3 x e4m3 accumulated in fp32 over K, scaled and stored as bf16."""
    row_tile = tile // column_tiles
    column_tile = tile % column_tiles
    group = tl.sum((tiles_through <= row_tile).to(tl.int32), 0)  # groups whose tiles all come before
    chosen = gs == group
    row_start = tl.sum(tl.where(chosen, starts + (row_tile - tiles_through + tiles) * BM, 0), 0)
    row_end = tl.sum(tl.where(chosen, ends, 0), 0)
    rows = row_start + tl.arange(0, BM)
    columns = column_tile * BN + tl.arange(0, BN)
    row_ok = rows < row_end
    column_ok = columns < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TMA:
        # boxes past the tensors' ends read zeros (K, N, M); rows of the next group are multiplied but never stored
        for k0 in range(0, K, BK):
            x = a_desc.load([row_start, k0])
            w = b_desc.load([group, column_tile * BN, k0]).reshape(BN, BK)
            acc = tl.dot(x, w.T, acc)
    else:
        # both operands are K-contiguous (the kernel contract of experts/fp8.py): unit strides over K, so the tile
        # loads are contiguous 16-byte vectors that Triton can pipeline into shared memory
        ks = tl.arange(0, BK)
        a_ptrs = a + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
        b_ptrs = b + group.to(tl.int64) * stride_bg + columns.to(tl.int64)[None, :] * stride_bn + ks[:, None]
        for k0 in range(0, K, BK):
            if K % BK == 0:  # decided at compile time: V2-Lite's K (2048, 1408, 2816) need no mask over K
                x = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(b_ptrs, mask=column_ok[None, :], other=0.0)
            else:
                k_ok = k0 + ks < K
                x = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(b_ptrs, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc)
            a_ptrs += BK
            b_ptrs += BK
    sa = tl.load(scale_a + rows, mask=row_ok, other=0.0)
    sb = tl.load(scale_b + group * stride_sg + columns, mask=column_ok, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    tl.store(out + rows.to(tl.int64)[:, None] * stride_om + columns[None, :], acc.to(tl.bfloat16),
             mask=row_ok[:, None] & column_ok[None, :])


@triton.jit
def scaled_grouped_mm_kernel(a, b, a_desc, b_desc, out, scale_a, scale_b, offs, N, stride_am, stride_bg, stride_bn,
                             stride_sg, stride_om, ROWS_HINT, K: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr,
                             PERSISTENT: tl.constexpr, INTERPRETED: tl.constexpr = False):
    column_tiles = tl.cdiv(N, BN)
    # each group's row tiles from all the offsets in one vector load and a prefix sum (not a loop of G dependent
    # loads, a global-memory latency each); once per program, however many tiles it computes
    gs = tl.arange(0, GP)
    real = gs < G
    ends = tl.load(offs + gs, mask=real, other=0)
    starts = tl.load(offs + gs - 1, mask=real & (gs > 0), other=0)
    tiles = tl.where(real, tl.cdiv(ends - starts, BM), 0)
    tiles_through = tl.cumsum(tiles, 0)  # row tiles of groups 0..g
    all_tiles = tl.sum(tiles, 0) * column_tiles
    if PERSISTENT and INTERPRETED:  # the same tiles; the interpreter's tl.range takes no run-time bounds
        tile = tl.program_id(0)
        while tile < all_tiles:
            _tile(tile, column_tiles, gs, ends, starts, tiles, tiles_through, a, b, a_desc, b_desc, out, scale_a,
                  scale_b, N, stride_am, stride_bg, stride_bn, stride_sg, stride_om, K, BM, BN, BK, TMA)
            tile += tl.num_programs(0)
    elif PERSISTENT:  # about one program per SM striding over the tiles; flattened, so the loads of a program's next
        # tile can be issued during its current one's last K steps and epilogue
        for tile in tl.range(tl.program_id(0), all_tiles, tl.num_programs(0), flatten=True):
            _tile(tile, column_tiles, gs, ends, starts, tiles, tiles_through, a, b, a_desc, b_desc, out, scale_a,
                  scale_b, N, stride_am, stride_bg, stride_bn, stride_sg, stride_om, K, BM, BN, BK, TMA)
    else:  # one tile per program; the grid is sized for the worst case, programs past the last tile do nothing
        tile = tl.program_id(0)
        if tile >= all_tiles:
            return
        _tile(tile, column_tiles, gs, ends, starts, tiles, tiles_through, a, b, a_desc, b_desc, out, scale_a,
              scale_b, N, stride_am, stride_bg, stride_bn, stride_sg, stride_om, K, BM, BN, BK, TMA)


def load(compiled: bool = False):
    """This module executed afresh: its kernels defined under the current TRITON_INTERPRET, or compiled ones."""
    return fresh_module(__name__, __file__, compiled)
