"""Megatron-Core 0.16.1 bugs of its local (non-Transformer-Engine) layer spec.

megatron_esft always builds the local spec (models/provider.py), also on machines where TE imports, so these fixes
apply everywhere. Each one touches only the local spec (its norm choice, torch norms, MLA with a column-parallel
`linear_kv_down_proj`), so it changes nothing in a model built from another spec.
"""

from __future__ import annotations

import torch


def apply(patched: list[str]) -> None:
    import megatron.core.transformer.multi_latent_attention as mla

    # models/gpt/gpt_layer_specs.py:58-72 and models/backends.py:13-22 choose the local spec's norm at import:
    # apex's FusedLayerNorm whenever `import apex` succeeds (NGC images), which supports LayerNorm only, while DeepSeek
    # models use RMSNorm. `get_gpt_decoder_block_spec(normalization="RMSNorm")` would fix the layers' norms but not
    # the final one (gpt_layer_specs.py:644 takes LNImpl). Take the torch norm, as where apex is absent.
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for module in (gpt_layer_specs, backends):
        if module.LNImpl is not WrappedTorchNorm:
            module.LNImpl = WrappedTorchNorm
            patched.append(f"{module.__name__}.LNImpl = WrappedTorchNorm (apex's FusedLayerNorm has no RMSNorm)")

    # transformer/torch_norm.py:32 WrappedTorchNorm asserts `not config.sequence_parallel`, but MoE with TP>1 requires
    # sequence parallelism (moe_layer.py:379). Build the norm with SP off and tag its parameters sequence_parallel, so
    # finalize_model_grads all-reduces their gradients over TP exactly as for the TE/apex norms.
    from megatron.core.transformer import torch_norm

    if not getattr(torch_norm.WrappedTorchNorm, "_esft_sequence_parallel", False):
        original_new = torch_norm.WrappedTorchNorm.__new__

        def wrapped_torch_norm_new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
            sequence_parallel = config.sequence_parallel
            config.sequence_parallel = False
            try:
                norm = original_new(cls, config, hidden_size, eps, *args, **kwargs)
            finally:
                config.sequence_parallel = sequence_parallel
            for param in norm.parameters():
                param.sequence_parallel = sequence_parallel
            return norm

        torch_norm.WrappedTorchNorm.__new__ = staticmethod(wrapped_torch_norm_new)
        torch_norm.WrappedTorchNorm._esft_sequence_parallel = True
        patched.append("WrappedTorchNorm.__new__ (sequence-parallel norms)")

    # megatron/core/transformer/multi_latent_attention.py:607: with the local spec, `linear_kv_down_proj` is a
    # ColumnParallelLinear whose sharded output [latent | rope key] is all-gathered; the rope key `k_pos_emb` then
    # feeds only this rank's attention heads, so its gradient is partial over TP ranks, and the gather's backward
    # (a split) keeps one rank's slice and drops the other ranks' head contributions. (The TE spec duplicates that
    # linear instead and reduces the gradient.) The fixed gather sums the rope-key columns of the gradient over the
    # TP group before the split; the latent columns are already complete (kv_up_proj's backward reduced them).
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.tensor_parallel import mappings

    if not getattr(mla, "_esft_rope_key_gather", False):
        original_gather = mla.gather_from_tensor_model_parallel_region

        def gather(input_, group=None):
            rope_dim = getattr(input_, "_esft_rope_key_dim", None)
            if rope_dim is None:
                return original_gather(input_, group)
            return _GatherLatentAndRopeKey.apply(input_, mappings.get_tensor_model_parallel_group_if_none(group),
                                                 rope_dim)

        original_init = mla.MLASelfAttention.__init__

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if isinstance(self.linear_kv_down_proj, ColumnParallelLinear):
                rope_dim = self.config.qk_pos_emb_head_dim

                def tag(module, inputs, output):
                    output[0]._esft_rope_key_dim = rope_dim  # read by `gather` above, on this very tensor

                self.linear_kv_down_proj.register_forward_hook(tag)

        mla.gather_from_tensor_model_parallel_region = gather
        mla.MLASelfAttention.__init__ = init
        mla._esft_rope_key_gather = True
        patched.append("multi_latent_attention: rope-key gradient summed over TP before the kv_combined gather split")


class _GatherLatentAndRopeKey(torch.autograd.Function):
    """All-gather along the last dim; backward: all-reduce the last `rope_dim` columns, then keep this rank's slice."""

    @staticmethod
    def forward(ctx, input_, group, rope_dim):
        from megatron.core.tensor_parallel import mappings

        ctx.group, ctx.rope_dim = group, rope_dim
        return mappings._gather_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad):
        from megatron.core.tensor_parallel import mappings

        grad = grad.clone()
        rope = grad[..., -ctx.rope_dim:].contiguous()
        torch.distributed.all_reduce(rope, group=ctx.group)
        grad[..., -ctx.rope_dim:] = rope
        return mappings._split_along_last_dim(grad, ctx.group), None, None
