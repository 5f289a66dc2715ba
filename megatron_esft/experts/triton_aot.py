"""Ahead-of-time compilation of the experts' Triton kernels for a GPU that is not here: Triton lowers a kernel for
a given target (sm_90a Hopper, sm_100a Blackwell) without a driver, and its own ptxas reports the machine code's
resources. This is how a CPU-only machine (CI, or a session without a GPU) checks what a kernel's speed rests on:
tensor-core MMA instructions, tile loads pipelined through shared memory, no register spills, shared memory within
the SM's limit (tests/experts/test_fp8_triton_gemm.py, bench/bench_triton_compile.py)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

# the most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), per compute capability
MAX_SHARED_BYTES = {90: 227 * 1024, 100: 227 * 1024}
_PTXAS = {90: "ptxas", 100: "ptxas-blackwell"}


@dataclasses.dataclass
class CompiledKernel:
    """What one compilation produced: the PTX, and ptxas's resource report of the machine code."""

    capability: int
    ptx: str
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads

    def count(self, instruction: str) -> int:
        return self.ptx.count(instruction)

    @property
    def fp8_mma(self) -> int:
        """FP8 tensor-core MMA instructions (Hopper's wgmma, Blackwell's tcgen05 f8f6f4 kind)."""
        if self.capability == 90:
            return len(re.findall(r"wgmma\.mma_async\S*\.e4m3\.e4m3", self.ptx))
        return len(re.findall(r"tcgen05\.mma\S*kind::f8f6f4", self.ptx))

    @property
    def pipelined_loads(self) -> int:
        """Asynchronous global -> shared copies (cp.async, or TMA's bulk tensor copies)."""
        return self.count("cp.async")

    @property
    def tma_loads(self) -> int:
        """The Tensor Memory Accelerator's bulk tensor copies (global -> shared) among them."""
        return self.count("cp.async.bulk.tensor")


def compile_for(fn, signature: dict, constexprs: dict, *, divisible_by_16=(), num_warps=4, num_stages=3,
                capability=90) -> CompiledKernel:
    """`fn` (a @triton.jit function) compiled for compute capability `capability` with Triton's types in
    `signature` (name -> "*fp8e4nv", "i32", ..., constexprs left out) and the run-time arguments in `divisible_by_16`
    marked as the JIT marks 16-aligned pointers and multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    # Triton's own jitted helpers (the combine functions of tl.max, tl.sum, tl.cumsum) are interpreted for good in a
    # process that imported Triton under TRITON_INTERPRET=1: compiling a kernel that calls them fails, or, with the
    # kernel in Triton's cache from an earlier run, seems to work
    if not isinstance(triton.language.standard._sum_combine, JITFunction):
        raise RuntimeError("compile_for: Triton was imported under TRITON_INTERPRET=1 in this process; compile ahead "
                           "of time in a process without it")
    names = fn.arg_names
    unset = [names[i] for i in fn.constexprs if names[i] not in constexprs]
    if unset:  # it would be compiled as a run-time argument: both sides of its branches, another kernel
        raise ValueError(f"compile_for: no value for the constexpr parameter(s) {unset}")
    types = {name: "constexpr" if name in constexprs else signature[name] for name in names}
    source = ASTSource(fn, types, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / _PTXAS[capability]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        proc = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{capability}a", str(Path(tmp) / "kernel.ptx"),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas for sm_{capability}a failed: {proc.stderr.strip()[-500:]}")
    registers = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if not (registers and spills):  # a report in another format must not read as "no spills"
        raise RuntimeError(f"ptxas -v said no register or spill count: {proc.stderr.strip()[-500:]}")
    return CompiledKernel(capability, ptx, compiled.metadata.shared, int(registers.group(1)),
                          int(spills.group(1)) + int(spills.group(2)))
