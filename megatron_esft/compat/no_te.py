"""Megatron-Core 0.16.1 fixes for machines without Transformer Engine (CPU, or GPU without TE)."""

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

    # megatron/core/transformer/multi_latent_attention.py:50-65 imports TELinear from
    # megatron.core.extensions.transformer_engine, which exports MagicMock placeholders when TE is missing, so
    # HAVE_TE ends up True and line 185 `isinstance(self.linear_proj, TELinear)` raises TypeError. Force False.
    import megatron.core.transformer.multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False
        patched.append("multi_latent_attention.HAVE_TE = False")
