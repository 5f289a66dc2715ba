"""Model, DDP, optimizer and LR schedule for fine-tuning (Megatron-Core objects, configured like Megatron-LM).

* Megatron-Core `DistributedDataParallel` with the distributed optimizer (fp32 grad reduction); only parameters
  left trainable by esft/freeze.py get grad buffers and optimizer state.
* AdamW (decoupled weight decay; Megatron gives biases and 1-D params no weight decay, like the HF Trainer), global
  gradient clipping, bf16 parameters with fp32 main weights when --bf16 (GPU), fp32 otherwise.
* `OptimizerParamScheduler` stepped once per iteration: warmup, then constant / linear / cosine decay to --min-lr.
"""

from __future__ import annotations

import contextlib
import math

import torch

from megatron_esft.models.hf_config import DeepSeekConfig
from megatron_esft.models.provider import build_model
from megatron_esft.parallel import ParallelConfig


def initialize_parallel(parallel: ParallelConfig, seed: int) -> None:
    """`megatron_esft.parallel.initialize` (expert tensor parallelism is always 1 there, as in the model config)."""
    from megatron_esft import parallel as par

    par.initialize(parallel, seed)


def config_overrides(args, cfg: DeepSeekConfig, params_dtype: torch.dtype) -> dict:
    aux_coeff = cfg.aux_loss_alpha if args.moe_aux_loss_coeff is None else args.moe_aux_loss_coeff
    balancing = args.moe_router_load_balancing_type if aux_coeff > 0 else "none"
    overrides = dict(
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=aux_coeff if balancing != "none" else 0.0,
        pipeline_dtype=params_dtype,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
    )
    if cfg.score_function != "sigmoid":
        overrides.pop("moe_router_bias_update_rate")
    if args.recompute_granularity == "full":
        overrides.update(recompute_granularity="full", recompute_method=args.recompute_method,
                         recompute_num_layers=args.recompute_num_layers)
    elif args.recompute_granularity == "selective":
        overrides.update(recompute_granularity="selective")
        if args.recompute_modules is not None:
            overrides.update(recompute_modules=list(args.recompute_modules))
    return overrides


def training_fusions(args, cfg: DeepSeekConfig) -> tuple[str, ...]:
    """Every fused kernel this machine runs (none without CUDA), minus those turned off on the command line, plus
    FlexAttention when asked for."""
    from megatron_esft.models import fusions

    off = {"swiglu": not args.bias_swiglu_fusion, "rope": not args.apply_rope_fusion,
           "linear_cross_entropy": not args.linear_cross_entropy_fusion}
    chosen = tuple(name for name in fusions.resolve("auto", cfg) if not off[name])
    return chosen + (("flex_attention",) if args.flex_attention else ())


def build_trainable_model(args, cfg: DeepSeekConfig, parallel: ParallelConfig):
    params_dtype = torch.bfloat16 if args.bf16 else torch.float32
    return build_model(cfg, parallel, params_dtype=params_dtype, experts=args.experts_impl,
                       config_overrides=config_overrides(args, cfg, params_dtype),
                       fusions=training_fusions(args, cfg), moe_permutation=args.moe_permutation)


def mark_routed_experts_expert_parallel(model) -> None:
    """Routed-expert parameters are replicated over the expert-data-parallel group, which spans the TP ranks too
    (expert TP is 1): under sequence parallelism each TP rank's experts see only its shard's tokens, so their
    gradients must be summed over that group. Megatron marks them (`allreduce=False`, reduced over expert-DP) only
    when EP > 1; with EP = 1 and TP > 1 they would be reduced over the dense DP group only and miss the other TP
    ranks' tokens. Marking them always is exact in every layout (with EP = TP = 1 both groups are the DP group)."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def wrap_ddp(model, overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             bucket_size: int | None = None):
    """Megatron-Core DDP with the distributed optimizer's fp32 grad buffers (trainable parameters only).

    `overlap_grad_reduce` (Megatron-LM's --overlap-grad-reduce): each bucket's reduce-scatter starts as soon as
    backward has produced all its gradients, instead of after the whole backward. With ESFT every trainable
    parameter gets a gradient in every backward (a trainable expert without tokens gets zeros, and the hang guard
    keeps backward reaching the lowest trained layer), which the overlapped buckets need: they launch once each of
    their parameters has reported. `overlap_param_gather` (--overlap-param-gather): the updated weights' all-gather
    runs during the next forward (DDP's forward pre-hooks wait for each bucket); until then the bf16 weights are
    stale, so evaluation and checkpointing go through `parameters_gathered`. `bucket_size`: parameters per bucket
    (Megatron-LM's --ddp-bucket-size; default with overlap: max(40M, 1M x DP))."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    mark_routed_experts_expert_parallel(model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


@contextlib.contextmanager
def parameters_gathered(ddp_model):
    """Up-to-date model weights inside the block, with --overlap-param-gather too (what Megatron-LM does around
    evaluation and checkpoint saves): DDP's forward pre-hooks come off, which all-gathers every bucket now, and are
    put back afterwards. Without overlapped gathers the weights are current after every optimizer step already."""
    if not getattr(ddp_model, "use_forward_hook", False):
        yield
        return
    ddp_model.disable_forward_pre_hook()  # param_sync=True: a synchronous all-gather of every bucket
    try:
        yield
    finally:
        ddp_model.enable_forward_pre_hook()


def build_optimizer(args, ddp_model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_esft.compat import use_torch_adam

    use_torch_adam()
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=True,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    if args.fused_adam:
        use_fused_adam(optimizer)
    if args.check_for_nan_in_loss_and_grad:
        from megatron_esft.training.finite_check import check_grad_norm_before_update

        check_grad_norm_before_update(optimizer)
    return optimizer


def params_l2_norm(optimizer) -> float:
    """L2 norm of the trained parameters (Megatron-LM's --log-params-norm; frozen weights never change, so only the
    trained ones say anything). Computed on the optimizer's fp32 main weights, each element once over all ranks,
    exactly as Megatron-Core's gradient norm treats their gradients: the distributed optimizer's shards are disjoint,
    tensor-parallel duplicates and shared weights are skipped, and the sums are all-reduced over the same groups.
    A collective: every rank calls it."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.transformer.module import param_is_not_shared

    def counted(opt):
        return [p.detach() for p in opt.get_parameters() if param_is_not_shared(p)
                and tensor_parallel.param_is_not_tensor_parallel_duplicate(p, getattr(opt, "tp_group", None))]

    chained = optimizer.chained_optimizers
    if optimizer.grads_states_parallel_group_is_shared():
        tensors = [t for opt in chained for t in counted(opt)]
        return float(get_grad_norm_fp32(tensors, grad_stats_parallel_group=optimizer.get_grad_stats_parallel_group()))
    norms = [get_grad_norm_fp32(counted(opt), grad_stats_parallel_group=opt.get_grad_stats_parallel_group())
             for opt in chained]
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def use_fused_adam(optimizer) -> int:
    """Run the torch AdamW inside Megatron-Core's (chained, distributed) optimizer as torch's fused kernel.

    Without Transformer Engine or apex Megatron-Core falls back to `torch.optim.AdamW` with its default multi-tensor
    ("foreach") implementation: ~10 elementwise passes over the fp32 main weights and states, ~10 % of a
    micro-batch-1 ESFT step on the H100 (docs/gpu.md). Megatron-LM uses a fused Adam (apex / TE) by default; torch's
    own (`fused=True`, CPU and CUDA) is the same update in one kernel per dtype and device. The flag lives in each param
    group, so it is set there. Call it again after loading optimizer state: the loaded groups carry the checkpoint's
    flags, and Megatron restores the per-parameter `step` as a CPU tensor, which the fused kernel wants on the
    parameter's device. Returns how many torch optimizers were switched."""
    from megatron_esft.checkpoint.training_state import live_optimizers

    switched = 0
    for live in live_optimizers(optimizer):
        inner = live.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
                for param in group["params"]:
                    state = inner.state.get(param, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(dtype=torch.float32, device=param.device)
            inner.defaults.update(fused=True, foreach=False)
            switched += 1
    return switched


def schedule_settings(args) -> dict:
    """The learning-rate and weight-decay schedule of the command line, under the names of Megatron-Core's
    OptimizerParamScheduler (its arguments and its state dict)."""
    style = args.lr_decay_style
    decay_iters = args.lr_decay_iters or args.train_iters
    # --lr-warmup-fraction: a (float) fraction of the decay length, as Megatron-LM computes it
    warmup = args.lr_warmup_iters if args.lr_warmup_fraction is None else args.lr_warmup_fraction * decay_iters
    return {
        "max_lr": args.lr,
        "min_lr": args.min_lr if style != "constant" else args.lr,
        "lr_warmup_steps": warmup,
        "lr_decay_steps": max(decay_iters, math.floor(warmup) + 1),
        "lr_decay_style": style,
        "start_wd": args.weight_decay,
        "end_wd": args.weight_decay,
    }


# schedule values a resumed run compares with its checkpoint's, and the flags that set them
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-fraction",
                   "lr_decay_steps": "--lr-decay-iters (default: --train-iters)",
                   "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay"}


def schedule_differences(args, saved: dict) -> list[str]:
    """Where the command line's schedule differs from a checkpoint's saved scheduler state, as `--flag new
    (checkpoint: old)`. A constant schedule ignores --min-lr and the decay length, so those count only when both
    schedules decay."""
    ours = schedule_settings(args)
    decaying = ours["lr_decay_style"] != "constant" and saved.get("lr_decay_style") != "constant"
    return [f"{flag} {ours[key]} (checkpoint: {saved.get(key)})" for key, flag in _SCHEDULE_FLAGS.items()
            if ours[key] != saved.get(key) and (decaying or key not in ("min_lr", "lr_decay_steps"))]


def build_scheduler(args, optimizer):
    """Megatron-Core's OptimizerParamScheduler. On resume its state comes from the checkpoint: the step count always,
    the schedule's values too unless --override-opt_param-scheduler (Megatron-LM's flag) gives the command line's
    precedence (the trainer refuses a resume whose schedule differs from the checkpoint's without either flag)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    settings = schedule_settings(args)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init if settings["lr_warmup_steps"] else args.lr,
        **settings,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


def load_scheduler_state(scheduler, state: dict) -> None:
    """Restore the scheduler of a resumed run. Megatron-Core's scheduler reads the peak and minimum learning rate of
    each optimizer param group (`max_lr`, `min_lr`: set from the command line when the optimizer is built) before its
    own, so keeping the checkpoint's schedule (the default; --use-checkpoint-opt_param-scheduler) also means putting
    the checkpoint's values into the groups, and the current step's learning rate is then set again from them."""
    scheduler.load_state_dict(state)
    if not scheduler.override_opt_param_scheduler:
        for group in scheduler.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.step(increment=0)


def configure_schedule_hooks(ddp_model, optimizer) -> None:
    """What Megatron-LM's training loop sets on the model config for `get_forward_backward_func`."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_model.config
    config.no_sync_func = ddp_model.no_sync
    # with overlapped grad reduction the pipeline schedule launches the last buckets itself (Megatron-LM's
    # default --align-grad-reduce); without it finalize_model_grads reduces everything after backward
    config.grad_sync_func = ddp_model.start_grad_sync if ddp_model.ddp_config.overlap_grad_reduce else None
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.timers = None


def log_autotuned_fp8_gemms(args) -> None:
    """After the first logged iteration, with --expert-fp8-gemm-kernel triton and no pinned candidate: the candidate
    the autotuner chose per GEMM shape, to pin with --expert-fp8-gemm-config for bit-identical runs (rank 0's)."""
    if args.expert_fp8_gemm_kernel != "triton" or args.expert_fp8_gemm_config:
        return
    from megatron_esft import parallel as par
    from megatron_esft.experts import fp8_triton_gemm

    choices = fp8_triton_gemm.autotuned_choices()
    if choices:
        par.print_rank0("Triton FP8 GEMM autotuned (N, K, rows per group): " + "; ".join(
            f"{n} {k} {rows}: {label}" for (n, k, rows), label in sorted(choices.items()))
            + " (pin one with --expert-fp8-gemm-config)")
