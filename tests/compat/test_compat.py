import subprocess
import sys

import torch


def test_cpu_patches_listed_and_idempotent():
    from megatron_esft import compat

    first = list(compat.apply())
    assert compat.apply() == first  # applied once
    if not torch.cuda.is_available():
        assert any("CudaToCpuMode" in p for p in first)
        assert any("maybe_move_tensor_to_cpu" in p for p in first)
    assert any("te_general_gemm" in p for p in first) != compat.have_transformer_engine()


def test_compat_cli_prints_patches():
    proc = subprocess.run([sys.executable, "-m", "megatron_esft.compat"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "transformer_engine: False" in proc.stdout and "patched" in proc.stdout
