"""The layer spec on machines with apex or Transformer Engine (NGC images): still the tested local spec.

Neither apex nor TE can be installed on a CPU machine. apex is simulated by an empty `apex` module, which is exactly
what Megatron-Core's spec code tests (`import apex` succeeding selects apex's FusedLayerNorm); TE's presence is
simulated by `compat.have_transformer_engine` answering True, which is what the compat layer consults."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD_WITH_APEX_IMPORTABLE = r"""
import json, sys, types
sys.modules["apex"] = types.ModuleType("apex")  # `import apex` succeeds, as on NGC images
import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron_esft.models.hf_config import parse_hf_config
from megatron_esft.models.provider import build_model
from megatron_esft.models.tiny import TinySpec, hf_config_dict
from megatron_esft.parallel import ParallelConfig, initialize

assert gpt_layer_specs.LNImpl is FusedLayerNorm  # Megatron-Core took the apex norm
initialize(ParallelConfig(), seed=1)
results = {}
for arch in sys.argv[1:]:
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch=arch)))
    torch.manual_seed(0)
    model = build_model(cfg, experts="grouped")
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    loss = model(tokens, torch.arange(12)[None], None, labels=tokens).float().mean().item()
    norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    results[arch] = {"loss": loss, "norms": norms, "keys": sorted(model.state_dict())}
print("RESULT " + json.dumps(results))
"""


def _build_in_subprocess(archs: list[str], code: str) -> dict:
    """{arch: its model's loss, norm classes and state-dict keys}, all built in one process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code, *archs], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_apex_importable_still_builds_torch_rmsnorms(tmp_path):
    """apex's FusedLayerNorm supports LayerNorm only; DeepSeek uses RMSNorm everywhere, including MLA's latent norms and
    the final norm. With apex importable the model must be the same one as without it: same keys, same loss."""
    archs = ["deepseek-v3", "deepseek-moe"]  # V3: MLA with q-LoRA (q and kv latent norms)
    with_apex = _build_in_subprocess(archs, BUILD_WITH_APEX_IMPORTABLE)
    without_apex = _build_in_subprocess(archs, BUILD_WITH_APEX_IMPORTABLE.replace(
        'sys.modules["apex"] = types.ModuleType("apex")', "pass").replace(
        "assert gpt_layer_specs.LNImpl is FusedLayerNorm", "assert gpt_layer_specs.LNImpl is not FusedLayerNorm"))
    assert with_apex.keys() == without_apex.keys() == set(archs)
    for arch in archs:
        assert with_apex[arch]["norms"] == ["RMSNorm"], (arch, with_apex[arch]["norms"])
        assert with_apex[arch]["keys"] == without_apex[arch]["keys"], arch
        assert with_apex[arch]["loss"] == without_apex[arch]["loss"], arch


def test_local_spec_fixes_apply_when_transformer_engine_imports():
    """The sequence-parallel norm and MLA rope-key fixes concern the local spec, which is built also where TE imports;
    the fixes of TE's absence are skipped there."""
    code = ("import megatron_esft.compat as compat\n"
            "compat.have_transformer_engine = lambda: True\n"
            "print('\\n'.join(compat.apply()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    patched = proc.stdout
    assert "WrappedTorchNorm.__new__ (sequence-parallel norms)" in patched
    assert "rope-key gradient summed over TP" in patched
    assert "te_general_gemm" not in patched and "HAVE_TE" not in patched
