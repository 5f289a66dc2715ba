"""The Triton FP8 grouped GEMM (megatron_esft/experts/fp8_triton_gemm.py) compiled ahead of time for Hopper and
Blackwell, on any machine (no GPU): per autotuning candidate and V2-Lite contraction size, the resources of the
machine code that ptxas reports, and whether the code has what the kernel's speed rests on (FP8 tensor-core MMA,
tile loads pipelined through shared memory, no spills). Then the same for the hand-written FP8 quantizers
(experts/fp8_triton_quantize.py) at V2-Lite's row lengths: registers, spills, 16-byte loads, the hardware's e4m3
conversions. Static facts, not timings: bench/gpu_esft.py's `gemm` job times the kernels on a GPU.

    .venv/bin/python bench/bench_triton_compile.py [--capability 90 100] [--k 2048 1408 2816]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# compiled kernels only: Triton's own helpers would be defined as the interpreter's if it were set when Triton loads
os.environ.pop("TRITON_INTERPRET", None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capability", type=int, nargs="+", default=[90, 100], choices=[90, 100],
                   help="compute capabilities to compile for (90: H100/H200, 100: B200)")
    p.add_argument("--k", type=int, nargs="+", default=[2048, 1408, 2816],
                   help="contraction sizes (V2-Lite: hidden 2048, expert ffn 1408, fc1's 2 x 1408)")
    args = p.parse_args(argv)
    import triton

    from megatron_esft.experts.fp8_triton_gemm import _configs, compile_ahead_of_time
    from megatron_esft.experts.triton_aot import MAX_SHARED_BYTES

    print(f"triton {triton.__version__}; one row per (target, autotuning candidate, K); 64 expert groups")
    print("\n| target | grid, tile loads | BM x BN x BK | warps | stages | K | registers | spill bytes | "
          "shared KiB (of max) | FP8 MMA instructions | async copies | of them TMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for capability in args.capability:
        for config in _configs(triton):
            tile = "{BM} x {BN} x {BK}".format(**config.kwargs)
            loads = ("persistent " if config.kwargs["PERSISTENT"] else "") + ("TMA" if config.kwargs["TMA"] else "pointer")
            for k in args.k:
                c = compile_ahead_of_time(config, k, capability=capability)
                print(f"| sm_{capability}a | {loads} | {tile} | {config.num_warps} | {config.num_stages} | {k} | "
                      f"{c.registers} | {c.spill_bytes} | {c.shared_bytes / 1024:.0f} ({MAX_SHARED_BYTES[capability] // 1024}) | "
                      f"{c.fp8_mma} | {c.pipelined_loads} | {c.tma_loads} |", flush=True)
    print_quantizer_table(args.capability)


def print_quantizer_table(capabilities):
    from megatron_esft.experts import fp8_triton_quantize

    # (kernel, its row length at V2-Lite's shapes: hidden 2,048, expert FFN 1,408 per SwiGLU half; constexprs)
    kernels = [("quantize_rows_kernel", 2048, {}), ("swiglu_quantize_kernel", 1408, {}),
               ("swiglu_backward_quantize_kernel", 1408, {"KEEP": False}),
               ("swiglu_backward_quantize_kernel", 1408, {"KEEP": True}),
               ("quantize_columns_kernel", 2816, {}), ("quantize_columns_kernel", 2048, {})]
    print("\n| target | FP8 quantizer kernel | reduced length | values per program | warps | registers | spill bytes | "
          "16-byte load instructions | e4m3 conversions (2 values each) | IEEE reciprocals |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for capability in capabilities:
        for name, length, constexprs in kernels:
            c = fp8_triton_quantize.compile_ahead_of_time(name, length, capability, **constexprs)
            if name == "quantize_columns_kernel":
                rows, columns, warps = fp8_triton_quantize.COLUMN_TILE
                tile = f"{rows} x {columns} tiles (N x K), looped over N twice"
            else:
                block, rows, warps = fp8_triton_quantize.launch_settings(length)
                tile = f"{rows} row(s) of {block}"
            label = name.removesuffix("_kernel") + (" (keep bf16 dh)" if constexprs.get("KEEP") else "")
            print(f"| sm_{capability}a | {label} | {length} | {tile} | {warps} | {c.registers} | "
                  f"{c.spill_bytes} | {c.count('ld.global.v4.b32')} | {c.count('cvt.rn.satfinite.e4m3x2.f32')} | "
                  f"{c.count('div.rn.f32')} |", flush=True)


if __name__ == "__main__":
    main()
