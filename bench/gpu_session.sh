#!/usr/bin/env bash
# One device command for a GPU session of issue 7 (H100/H200, torch 2.11 + CUDA, no TE, no internet): the GPU-only
# tests, then bench/gpu_esft.py's most informative jobs, all inside one command of the device tool (~9 minutes; a
# session gets 15 minutes of device time, machine start included). Everything lands under $OUT (results.jsonl is
# appended job by job, so a run cut off by the limit still returns what finished; print its tables here with
# `python bench/gpu_esft.py --report <files_at>/results.jsonl`).
#
# Here, once (the GPU image has no internet; .whl/ is git-ignored and travels with `carry`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# Then one device call:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
# Stages take at most TESTS_S and BENCH_S seconds (environment variables); BENCH_ARGS is added to the benchmark's
# arguments (`BENCH_ARGS="--tiny --seq 64" bash bench/gpu_session.sh` smoke-tests the script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
TESTS_S=${TESTS_S:-180}
BENCH_S=${BENCH_S:-350}

if ! python3 -c "import megatron.core" 2>/dev/null; then
    ls .whl/megatron_core-*.whl >/dev/null 2>&1 || { echo "no .whl/megatron_core-*.whl: see the header"; exit 2; }
    # into the interpreter itself (commands run as root there): the tests' subprocesses set their own PYTHONPATH
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/megatron_core-*.whl || exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
    | tee -a "$OUT/device.txt"

# 1. correctness on the real kernels: every GPU-only test (skipped on CPU CI); the trainer runs (slowest) last
timeout "$TESTS_S" python3 -m pytest -q -p no:cacheprovider --timeout 120 -rs \
    tests/experts/test_offload.py tests/experts/test_experts_permute.py tests/experts/test_fp8_swiglu.py \
    tests/experts/test_fp8.py tests/experts/test_permutation.py tests/models/test_fusions.py \
    tests/models/test_linear_cross_entropy.py \
    tests/training/test_expert_load.py tests/training/test_gpu_training.py tests/training/test_log.py 2>&1 | tee "$OUT/tests.log" | tail -25

# 2. the benchmark, in the order of what it decides: the check and the experts table (FP8 against bf16 experts); 27
#    layers, bf16 and FP8 with the frozen experts' cache and their bf16 weights in host memory (model TFLOP/s, what
#    fits; the bf16 job profiled: where the time goes now); 4 layers: FP8 against bf16, the fused kernels' and the
#    permutation's effect (neither against both), ESFT against FFT; last, whether micro-batch 2 fits at 27 layers with
#    selective recompute
PLAN='[{"job":"check"},{"job":"experts"},
 {"job":"model","mode":"esft","backend":"bf16","layers":27,"profile":true},
 {"job":"model","mode":"esft","backend":"fp8","layers":27,"cache":"frozen","offload":true},
 {"job":"model","mode":"esft","backend":"bf16","layers":4},
 {"job":"model","mode":"esft","backend":"fp8","layers":4,"cache":"frozen"},
 {"job":"model","mode":"esft","backend":"bf16","layers":4,"fusions":"none","permutation":"megatron"},
 {"job":"model","mode":"fft","backend":"bf16","layers":4},
 {"job":"model","mode":"esft","backend":"bf16","layers":27,"mbs":2,"recompute":"selective:layernorm,mla_up_proj,moe_act"}]'
timeout "$BENCH_S" python3 bench/gpu_esft.py --timeout 150 --warmup 2 --iters 5 --plan "$PLAN" --out "$OUT" \
    ${BENCH_ARGS:-} \
    2>&1 | grep -v "^\[{" | tail -40
