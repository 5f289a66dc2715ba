"""Build a Megatron-Core GPTModel for a DeepSeek config.

`transformer_config` maps a `DeepSeekConfig` onto Megatron-Core's (MLA)TransformerConfig; `block_spec` builds the layer
specs; `build_model` returns the GPTModel for this rank's pipeline stage.

The layer spec is always Megatron-Core's local spec (Megatron-LM's `--transformer-impl local`) with torch norms and
torch-SDPA attention, also on machines where Transformer Engine or apex import (NGC images): it is the spec every test
and benchmark of this project runs, the fused kernels of models/fusions.py and the frozen-aware experts replace its
modules, and it gives checkpoints the same keys on every machine.

Choices that matter for exact parity with the HF implementations:
* router logits in fp32 (`moe_router_dtype="fp32"`, like HF's gate) and softmax over all experts before top-k
  (`moe_router_pre_softmax`), no capacity / token dropping (dropless, like HF);
* V2 group-limited and normalized top-k go through `routing.DeepSeekV2TopK`; V3 uses Megatron's sigmoid + expert bias
  + group top-k, which already matches it;
* MLA always has its q/kv latent RMSNorms (`qk_layernorm=True`); MLA's RoPE uses DeepSeek's interleaved layout
  (Megatron's `multi_latent_attention` rope path);
* experts are never tensor-parallel (`expert_tensor_parallel_size=1`): ESFT freezes/trains whole experts, and the
  frozen-aware grouped experts keep an expert's weights in one place;
* norm weights are stored in the parameter dtype, as Megatron-LM's Float16Module does (Megatron's local-spec
  `WrappedTorchNorm` creates fp32 weights, and torch's RMSNorm then skips its fused kernel on bf16 inputs);
* fused kernels (`fusions`, models/fusions.py) are opt-in: the default is the eager torch path.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from megatron_esft.errors import UserError
from megatron_esft.models.hf_config import DeepSeekConfig
from megatron_esft.parallel import ParallelConfig

EXPERT_IMPLS = ("sequential", "grouped")


def check_parallel_layout(cfg: DeepSeekConfig, parallel: ParallelConfig) -> None:
    """UserError unless the model splits over this layout (experts over EP, heads and vocabulary over TP, layers over
    the pipeline stages). `transformer_config` runs it; the tools call it as soon as the checkpoint's config is
    read, so a bad layout fails before any data is loaded."""
    if cfg.n_routed_experts % parallel.ep:
        raise UserError(
            f"n_routed_experts {cfg.n_routed_experts} is not divisible by --expert-model-parallel-size {parallel.ep}"
        )
    if cfg.num_attention_heads % parallel.tp or cfg.num_key_value_heads % parallel.tp:
        raise UserError(f"attention heads are not divisible by --tensor-model-parallel-size {parallel.tp}")
    if cfg.vocab_size % parallel.tp:
        raise UserError(f"vocab_size {cfg.vocab_size} is not divisible by --tensor-model-parallel-size {parallel.tp}")
    pipeline_stage_layers(cfg.num_layers, parallel)


def pipeline_stage_layers(num_layers: int, parallel: ParallelConfig) -> list[int]:
    """Decoder layers per pipeline stage: an even split, or Megatron-LM's uneven one, where
    --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers fix the first / last stage and the
    stages between split the rest evenly (DeepSeek-V3's 61 layers, V2-Lite's 27 over 2 stages). UserError otherwise
    (before Megatron-Core's own ValueError, with the flags' names)."""
    pp, first, last = parallel.pp, parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers
    if first is None and last is None:
        if num_layers % pp:
            raise UserError(f"{num_layers} layers are not divisible by --pipeline-model-parallel-size {pp} (uneven "
                            "stages: --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers)")
        return [num_layers // pp] * pp
    if pp < 2:
        raise UserError("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
                        "--pipeline-model-parallel-size of at least 2")
    for flag, value in (("first", first), ("last", last)):
        if value is not None and value < 1:
            raise UserError(f"--decoder-{flag}-pipeline-num-layers {value}: must be at least 1")
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    if (middle_stages == 0 and middle != 0) or (middle_stages and (middle < middle_stages or middle % middle_stages)):
        raise UserError(f"{num_layers} layers over --pipeline-model-parallel-size {pp} with first stage {first} and "
                        f"last stage {last}: {middle} layers left for {middle_stages} other stage(s), which must split "
                        "them evenly (at least one each)")
    middle_split = [middle // middle_stages] * middle_stages if middle_stages else []
    return ([first] if first is not None else []) + middle_split + ([last] if last is not None else [])


def transformer_config(
    cfg: DeepSeekConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    params_dtype: torch.dtype = torch.float32,
    fusions: tuple[str, ...] = (),
    **overrides,
):
    """The (MLA)TransformerConfig for `cfg`. `fusions`: names already resolved by models/fusions.resolve.
    `overrides` are TransformerConfig fields (recompute, aux loss, ...)."""
    from megatron_esft.models import fusions as fusion_registry

    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    check_parallel_layout(cfg, parallel)
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # these fused kernels need apex/TE; SwiGLU and MLA-RoPE fusions come from `fusions` (below)
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        transformer_impl="local",  # block_spec's layer spec
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=1,
        sequence_parallel=parallel.tp > 1,
        # MoE
        num_moe_experts=cfg.n_routed_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts) or None,
        moe_layer_freq=[1 if cfg.is_moe_layer(layer) else 0 for layer in range(cfg.num_layers)],
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_router_score_function=cfg.score_function,
        moe_permute_fusion=False,
        # Megatron's per-layer CUDA graphs stay off (training/cuda_graph.py captures whole iterations); [] is its
        # default scope without the "full scope is deprecated" warning 0.16.1's own default "full" raises
        cuda_graph_scope=[],
    )
    fields.update(fusion_registry.config_fields(fusions))  # flex_attention is a core-attention class: block_spec
    if cfg.score_function == "softmax":
        # V2 / DeepSeekMoE: softmax over all experts, then top-k; DeepSeekV2TopK handles groups and renormalization.
        # a factor of 1.0 (V2-Lite, DeepSeekMoE) is left out: Megatron would multiply by it, an exact no-op kernel
        # per MoE layer
        scaling = None if cfg.norm_topk_prob or cfg.routed_scaling_factor == 1.0 else cfg.routed_scaling_factor
        fields.update(moe_router_pre_softmax=True, moe_router_topk_scaling_factor=scaling)
    else:
        fields.update(
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,  # bias stays as loaded (training turns updates on explicitly)
            moe_router_num_groups=cfg.n_group if cfg.n_group > 1 else None,
            moe_router_group_topk=cfg.topk_group if cfg.n_group > 1 else None,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        )
    if cfg.multi_latent_attention:
        yarn = cfg.rope_scaling
        fields.update(
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_head_dim=cfg.qk_nope_head_dim,
            qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            qk_layernorm=True,
            rotary_base=cfg.rope_theta,
            rope_type="yarn" if yarn else "rope",
            rotary_scaling_factor=yarn["factor"] if yarn else 1.0,
            original_max_position_embeddings=yarn["original_max_position_embeddings"] if yarn else 4096,
            beta_fast=yarn["beta_fast"] if yarn else 32.0,
            beta_slow=yarn["beta_slow"] if yarn else 1.0,
            mscale=yarn["mscale"] if yarn else 1.0,
            mscale_all_dim=yarn["mscale_all_dim"] if yarn else 0.0,
        )
        fields.update(overrides)
        return _validated_config(MLATransformerConfig, fields)
    if cfg.rope_scaling:
        raise UserError(f"{cfg.source}: yarn rope scaling is only supported with MLA")
    fields.update(
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
    )
    fields.update(overrides)
    return _validated_config(TransformerConfig, fields)


def _validated_config(config_class, fields: dict):
    """`config_class(**fields)`. Megatron-Core accepts the selective recompute module "moe_act" only for its own
    grouped-GEMM MLPs (`moe_grouped_gemm`); the frozen-aware grouped experts implement it as well (experts/grouped.py),
    so it joins `recompute_modules` after Megatron's validation (build_model refuses it for SequentialMLP)."""
    modules = fields.get("recompute_modules")
    moe_act = fields.get("recompute_granularity") == "selective" and modules is not None and "moe_act" in modules
    if moe_act:
        fields = dict(fields, recompute_modules=[m for m in modules if m != "moe_act"])
    config = config_class(**fields)
    if moe_act:
        config.recompute_modules.append("moe_act")
    return config


def block_spec(config, *, experts: str = "sequential", vp_stage=None, pp_rank=None, flex_attention: bool = False):
    """Local-spec decoder block for this pipeline stage: dense and MoE layers per `config.moe_layer_freq`, torch norms
    also where apex imports (compat/local_spec.py).
    `flex_attention`: packed-document attention through FlexAttention (models/attention.py). MoE layers dispatch with
    the gather permutation (experts/permutation.py; switchable after the build)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_esft.models.attention import TorchFlexCoreAttention, TorchSDPACoreAttention

    if experts not in EXPERT_IMPLS:
        raise UserError(f"unknown experts implementation {experts!r} (choose from {', '.join(EXPERT_IMPLS)})")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
    core_attention = TorchFlexCoreAttention if flex_attention else TorchSDPACoreAttention
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core_attention
    from megatron_esft.experts.spec import use_gather_permutation, use_grouped_experts

    if experts == "grouped":
        spec = use_grouped_experts(spec)
    return use_gather_permutation(spec)


def _attach_v2_topk(model, cfg: DeepSeekConfig) -> None:
    if cfg.score_function != "softmax" or (cfg.n_group <= 1 and not cfg.norm_topk_prob):
        return  # Megatron's native greedy top-k is exact
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_esft.models.routing import DeepSeekV2TopK

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.router_replay = DeepSeekV2TopK(cfg.n_group, cfg.topk_group, cfg.norm_topk_prob)


def _norms_to_params_dtype(model, params_dtype: torch.dtype) -> None:
    """Cast torch RMSNorm / LayerNorm weights (fp32 from WrappedTorchNorm) to the model's parameter dtype."""
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(params_dtype)


def build_model(
    cfg: DeepSeekConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    params_dtype: torch.dtype = torch.float32,
    experts: str = "sequential",
    meta_device: bool = False,
    config_overrides: dict | None = None,
    fusions=None,
    moe_permutation: str = "experts",
):
    """The GPTModel of this rank's pipeline stage (parallel state must be initialized, see megatron_esft.parallel).

    `meta_device=True` builds shapes only (no memory), which is how the converters get the sharded-state-dict layout
    of a model too large to materialize. `moe_permutation`: "experts" (default), "gather" or "megatron" (see
    experts/permutation.PERMUTATIONS).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

    # Process-global MoE state of Megatron-Core that must not leak from one model to the next: the aux-loss tracker
    # is sized by the first model built, and the aux-loss backward scale is created 0-dim by a backward run outside
    # Megatron's schedules (moe_utils.py:268) and then cannot take the schedules' [1]-shaped scale (moe_utils.py:286).
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    from megatron_esft.models import fusions as fusion_registry

    fusions = fusion_registry.resolve(fusions, cfg)
    from megatron_esft.models.gpt import ESFTGPTModel

    config = transformer_config(cfg, parallel, params_dtype=params_dtype, fusions=fusions, **(config_overrides or {}))
    if experts != "grouped" and config.recompute_granularity == "selective" and "moe_act" in config.recompute_modules:
        raise UserError("--recompute-modules moe_act needs the grouped experts (--experts-impl grouped); "
                        "Megatron-Core's SequentialMLP does not recompute its activation")
    if meta_device:
        config.use_cpu_initialization = True
        config.perform_initialization = False
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    spec = block_spec(config, experts=experts, pp_rank=pp_rank, flex_attention="flex_attention" in fusions)
    if cfg.num_nextn_predict_layers:
        from megatron_esft.parallel import print_rank0

        mtp = cfg.num_nextn_predict_layers
        # stderr: tools with --json own their stdout
        print_rank0(f"note: {mtp} multi-token-prediction layer(s) in the HF config are skipped", file=sys.stderr)
    context = torch.device("meta") if meta_device else contextlib.nullcontext()
    with context:
        model = ESFTGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.rope_theta,
        )
    model.linear_cross_entropy = "linear_cross_entropy" in fusions
    _attach_v2_topk(model, cfg)
    from megatron_esft.models.routing import use_frozen_aware_gating

    use_frozen_aware_gating(model)
    _norms_to_params_dtype(model, params_dtype)
    from megatron_esft.experts.permutation import set_moe_permutation

    set_moe_permutation(model, moe_permutation)
    if not meta_device and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
