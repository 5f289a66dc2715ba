"""Megatron-Core 0.16.1 bugs that fire whenever Transformer Engine is not importable (CPU, or a GPU without TE),
whatever the layer spec. Each fix here is skipped when TE imports, where the code it works around is correct."""

from __future__ import annotations


def apply(patched: list[str]) -> None:
    from megatron_esft.compat import have_transformer_engine

    if have_transformer_engine():
        return

    # megatron/core/transformer/moe/moe_utils.py:1192 (RouterGatingLinearFunction.forward) tests
    # `if te_general_gemm is not None`, but the name is only bound inside the TE try-block (line 34), so every router
    # forward raises NameError without TE. Bind it to None so the torch fallback runs. Fixed upstream in 0.19.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        patched.append("moe_utils.te_general_gemm = None")

    # megatron/core/tensor_parallel/random.py:636 CheckpointWithoutOutput sets `self.fp8 = fp8 is not None`, so its
    # default `fp8=False` (what TransformerLayer's selective "layernorm" recompute passes, transformer_layer.py:577/672)
    # takes the FP8 branch, which calls TE's FP8GlobalStateManager: NameError without TE. There is no FP8 without TE.
    from megatron.core.tensor_parallel import random as mcore_random

    if not getattr(mcore_random.CheckpointWithoutOutput, "_esft_no_fp8", False):
        original_checkpoint_init = mcore_random.CheckpointWithoutOutput.__init__

        def checkpoint_init(self, *args, **kwargs):
            original_checkpoint_init(self, *args, **kwargs)
            self.fp8 = False

        mcore_random.CheckpointWithoutOutput.__init__ = checkpoint_init
        mcore_random.CheckpointWithoutOutput._esft_no_fp8 = True
        patched.append("CheckpointWithoutOutput.fp8 = False (selective layernorm recompute)")

    # megatron/core/transformer/multi_latent_attention.py:50-65 imports TELinear from
    # megatron.core.extensions.transformer_engine, which exports MagicMock placeholders when TE is missing, so
    # HAVE_TE ends up True and line 185 `isinstance(self.linear_proj, TELinear)` raises TypeError. Force False.
    import megatron.core.transformer.multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False
        patched.append("multi_latent_attention.HAVE_TE = False")
