"""`python -m megatron_esft.compat`: list the active Megatron-Core compat patches on this machine."""

from megatron_esft.compat import apply, have_transformer_engine

import torch

patches = apply()
print(f"cuda available: {torch.cuda.is_available()}  transformer_engine: {have_transformer_engine()}")
for name in patches:
    print(f"  patched {name}")
if not patches:
    print("  nothing patched")
