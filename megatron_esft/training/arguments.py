"""Command-line arguments of pretrain_esft.py (Megatron-LM names) and their validation.

Every check that can fail on user input raises `UserError` before anything is written.
"""

from __future__ import annotations

import argparse

from megatron_esft.atomic import require_directory_or_absent
from megatron_esft.errors import ArgumentParser, UserError
from megatron_esft.parallel import add_distributed_timeout_argument, add_uneven_pipeline_arguments, timeout_minutes
from megatron_esft.training import manual_gc, profiling, timing, weight_checks

# Megatron-Core's selective recompute modules (TransformerConfig.recompute_modules)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="ESFT / full fine-tuning of a DeepSeek MoE model on Megatron-Core")
    g = p.add_argument_group("checkpoints and data")
    g.add_argument("--load", required=True, help="base checkpoint (convert_hf_to_mcore.py) or a training checkpoint")
    g.add_argument("--finetune", action="store_true",
                   help="start a new run from a training checkpoint's model weights only (no optimizer, RNG, data "
                        "position or iteration; mode and expert config from the command line), as in Megatron-LM; "
                        "a base checkpoint always starts a new run")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resuming: Adam starts afresh from the loaded weights (iteration, schedule and data position "
                        "still resume); a base checkpoint or --finetune loads no optimizer state anyway (Megatron-LM)")
    g.add_argument("--no-load-rng", action="store_true",
                   help="resuming: the RNG states are not restored (a base checkpoint or --finetune restores none "
                        "anyway; Megatron-LM)")
    g.add_argument("--ckpt-step", type=int, default=None, metavar="ITERATION",
                   help="load this iteration of --load instead of its latest (e.g. to resume before a divergence; "
                        "later iterations in --save are replaced as training reaches them)")
    g.add_argument("--save", default=None, help="directory for training checkpoints")
    g.add_argument("--train-data", nargs="+", required=True,
                   help="messages JSONL file(s) or indexed prefix(es); a weighted blend as in Megatron-LM's "
                        "--data-path: WEIGHT PATH WEIGHT PATH ... (shares of documents, e.g. 1 task.jsonl 1 "
                        "alignment.jsonl for the paper's 1:1 mix)")
    g.add_argument("--valid-data", nargs="+", default=None)
    g.add_argument("--split", default=None, help="Megatron-style train,valid split of --train-data, e.g. 98,2")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's hf_assets)")
    g.add_argument("--expert-config", default=None, help="official ESFT expert config JSON")
    g.add_argument("--finetune-mode", choices=["esft", "full"], default="esft")
    g.add_argument("--template", default="esft")
    g.add_argument("--no-pack", action="store_true", help="one conversation per sample instead of packing")

    g = p.add_argument_group("schedule")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm up over this fraction of the decay length (--lr-decay-iters, default --train-iters), "
                        "as Megatron-LM; instead of --lr-warmup-iters")
    g.add_argument("--lr-warmup-init", type=float, default=0.0,
                   help="the learning rate warm-up starts from (Megatron-LM's; default 0)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--no-fused-adam", dest="fused_adam", action="store_false",
                   help="torch's multi-tensor AdamW instead of its fused kernel (the default, as Megatron-LM's "
                        "apex/TE FusedAdam)")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, continue with this command's learning-rate/weight-decay schedule (--lr, "
                        "--min-lr, --lr-*, --weight-decay) instead of the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's schedule even where this command's differs (without "
                        "either flag such a resume is refused)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false",
                   help="keep training when the loss or the gradient norm is NaN/Inf (default: stop before the "
                        "optimizer step, as Megatron-LM)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("model and parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    add_uneven_pipeline_arguments(g)
    add_distributed_timeout_argument(g)
    g.add_argument("--experts-impl", choices=["grouped", "sequential"], default="grouped")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="Megatron-Core layer spec. Only local is built, also where Transformer Engine imports "
                        "(Megatron-LM's default is transformer_engine; see docs/troubleshooting.md)")
    # what Megatron-LM scripts pass and megatron_esft always does: accepted, so those scripts run unchanged
    g.add_argument("--sequence-parallel", action="store_true",
                   help="accepted for Megatron-LM scripts: sequence parallelism is always on with TP > 1 (MoE "
                        "needs it)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="accepted for Megatron-LM scripts: the distributed optimizer is always used")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce-scatter each gradient bucket while backward still runs (data parallelism)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the updated weights bucket by bucket during the next forward (needs "
                        "--overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient bucket with --overlap-grad-reduce (default: max(40M, 1M x DP))")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters with fp32 main weights (GPU only)")
    g.add_argument("--expert-gemm", choices=["bf16", "fp8"], default="bf16",
                   help="routed-expert GEMMs of --experts-impl grouped: fp8 = row-wise scaled FP8 forward and "
                        "input-gradient GEMMs, bf16 weight gradients (Hopper GPUs; see docs/gpu.md)")
    g.add_argument("--expert-fp8-weight-cache", choices=["frozen", "none", "all"], default="frozen",
                   help="with --expert-gemm fp8: keep e4m3 copies of frozen expert weights (frozen: fastest, +2 bytes "
                        "per frozen expert parameter of GPU memory), re-quantize every step (none), or also cache "
                        "trainable ones between optimizer steps (all)")
    g.add_argument("--expert-fp8-gemm-kernel", choices=["torch", "triton"], default="torch",
                   help="with --expert-gemm fp8: the FP8 grouped GEMM kernel, torch._scaled_grouped_mm (torch) or "
                        "megatron_esft's Triton kernel (triton: autotuned for ESFT's small expert groups; not yet "
                        "measured on a GPU, docs/gpu.md)")
    g.add_argument("--expert-fp8-gemm-config", default=None, metavar="CANDIDATE",
                   help="with --expert-fp8-gemm-kernel triton: always launch this autotuning candidate, e.g. "
                        "'TMA 64x128x128 w4 s4' (the first iteration's log names the autotuned ones), instead of "
                        "autotuning in every process: bit-identical runs and resumes")
    g.add_argument("--expert-fp8-quantizer", choices=["inductor", "triton"], default="inductor",
                   help="with --expert-gemm fp8: the kernels that quantize the experts' activations and weights, "
                        "torch.compile's (inductor) or megatron_esft's hand-written Triton ones (triton: each row read "
                        "once; not yet measured on a GPU, docs/gpu.md)")
    g.add_argument("--offload-frozen-experts", action="store_true",
                   help="with --expert-gemm fp8 and a weight cache: keep the frozen experts' bf16 weights in pinned "
                        "host memory (read only by checkpoints) and only their FP8 copies on the GPU, so the cache "
                        "costs no extra GPU memory (docs/gpu.md)")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="eager SwiGLU instead of Megatron-Core's compiled fused kernel (used by default on a GPU)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="eager MLA YaRN RoPE instead of Megatron-Core's Triton kernels (used by default on a GPU "
                        "with Triton)")
    g.add_argument("--no-linear-cross-entropy-fusion", dest="linear_cross_entropy_fusion", action="store_false",
                   help="Megatron-Core's output layer + fp32 cross-entropy instead of the chunked fused loss (used by "
                        "default on a GPU when the output layer is frozen, docs/gpu.md)")
    g.add_argument("--flex-attention", action="store_true",
                   help="packed-document attention through torch FlexAttention with a block mask (skips other "
                        "documents' blocks; GPU only; not measured yet, see docs/gpu.md)")
    g.add_argument("--moe-permutation", choices=["experts", "gather", "megatron"], default="experts",
                   help="MoE token (un)permutation: gather = gathers only, no atomics and no host sync (dropless "
                        "top-k; experts/permutation.py); experts = the same, done by the grouped experts straight "
                        "into their trainable/frozen row order when one rank holds all experts (EP = 1; FP8 experts "
                        "quantize the tokens before the gather), else gather; megatron = Megatron-Core's unfused "
                        "permute/unpermute, what Megatron-LM runs without TE's --moe-permute-fusion")
    g.add_argument("--moe-token-counts", choices=["host", "device"], default="host",
                   help="device = the grouped experts' token counts stay on the GPU: no host sync per MoE layer "
                        "(one grouped GEMM per projection over all experts; +1 copy of the trained experts' "
                        "weights, bf16 or, with --expert-gemm fp8 and a weight cache, e4m3 in two layouts; with "
                        "--moe-permutation experts at EP = 1; docs/gpu.md); host = "
                        "Megatron's copy of the counts to the host")
    g.add_argument("--cuda-graph-impl", choices=["none", "local", "transformer_engine"], default="none",
                   help="local with --cuda-graph-scope full_iteration: capture each iteration's forward and backward "
                        "(all micro-batches) in one CUDA graph and replay it (training/cuda_graph.py; needs "
                        "--moe-token-counts device for MoE layers; 2x the eager step of V2-Lite ESFT on an H200, "
                        "docs/gpu.md); "
                        "transformer_engine needs Transformer Engine")
    g.add_argument("--cuda-graph-scope", nargs="+", default=None, metavar="SCOPE",
                   help="with --cuda-graph-impl local: full_iteration (the only scope megatron_esft captures)")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="eager iterations before the capture, at least 2 (the second also checks that nothing in "
                        "the iteration synchronizes with the host; on a CPU, where nothing is captured, the third "
                        "must also repeat the second op by op)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--recompute-modules", nargs="*", choices=RECOMPUTE_MODULES, default=None, metavar="MODULE",
                   help="with --recompute-granularity selective: the submodules whose activations are recomputed "
                        f"in backward, any of {', '.join(RECOMPUTE_MODULES)} (default: core_attn, as Megatron-LM). "
                        "moe = the whole MoE layer; moe_act = the routed experts' SwiGLU output (trainable experts "
                        "only save it); mla_up_proj = MLA's q/k/v up-projections and RoPE")
    g.add_argument("--moe-router-load-balancing-type", choices=["seq_aux_loss", "aux_loss", "none"],
                   default="seq_aux_loss", help="seq_aux_loss with --moe-aux-loss-coeff 1e-3 is the reference model's")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="default: the HF config's aux_loss_alpha (0 turns the aux loss off)")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=0.0,
                   help="V3 expert-bias update rate (must be 0 when the router is frozen)")

    g = p.add_argument_group("logging, evaluation, saving")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-params-norm", action="store_true",
                   help="L2 norm of the trained parameters (the optimizer's fp32 main weights) in the iteration "
                        "line and TensorBoard (params-norm)")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="number of zero entries in the trained parameters' gradients in the iteration line and "
                        "TensorBoard (num-zeros)")
    g.add_argument("--log-throughput", action="store_true",
                   help="model TFLOP/s per GPU in the iteration line and TensorBoard, counting useful FLOPs only (no "
                        "weight gradients of frozen weights, no input gradients below the lowest trained layer)")
    g.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    g.add_argument("--save-trained-weights-only", action="store_true",
                   help="ESFT: checkpoints hold the trained parameters only (plus optimizer and training state); "
                        "the frozen weights are read from the base checkpoint, which must stay in place")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints from a background process while training goes on (the tensors are "
                        "copied to host memory first); an iteration becomes the latest once written")
    g.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints without the optimizer state (a resume from one starts Adam afresh from its "
                        "weights; Megatron-LM's flag): an ESFT checkpoint of V2-Lite loses ~15 GiB")
    g.add_argument("--no-save-rng", action="store_true",
                   help="checkpoints without the RNG states (Megatron-LM's flag)")
    g.add_argument("--save-retain-interval", type=int, default=None, metavar="ITERATIONS",
                   help="keep only every this many iterations' checkpoints and the newest: the previous newest is "
                        "removed once a later one is saved (a multiple of --save-interval; Megatron-LM's flag)")
    g.add_argument("--no-ckpt-fully-parallel-save", action="store_false", dest="ckpt_fully_parallel_save",
                   help="write every tensor that several ranks hold (the dense weights on each data-parallel replica) "
                        "from its first holder, instead of spreading them over the holders (Megatron-LM's flag)")
    g.add_argument("--ckpt-fully-parallel-save", action="store_true", dest="ckpt_fully_parallel_save", default=True,
                   help="the default (accepted as in Megatron-LM, where it is on by default too)")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   help="every checkpoint of the run has the same tensors and shards: the writer plans the first "
                        "saves and reuses the plan, and later saves skip the sharding validation (fewer collectives "
                        "per save; Megatron-LM's flag)")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None, help="validation micro-steps (default: the whole set)")
    g.add_argument("--no-keep-best", action="store_true", help="do not keep the best-validation checkpoint")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="GPU memory (allocated, max allocated, reserved) at every --log-interval in TensorBoard")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) at this iteration")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, finish the iteration, save a checkpoint (with --save) and exit")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, metavar="MINUTES",
                   help="after the first iteration that ends this many minutes after start-up, save a checkpoint "
                        "(with --save) and exit (for a job's time limit)")
    timing.add_arguments(p)
    manual_gc.add_arguments(p)
    profiling.add_arguments(p)
    weight_checks.add_arguments(p)
    return p


def _positive(args, *names):
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")


def validate(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    _positive(args, "train-iters", "micro-batch-size", "global-batch-size", "seq-length", "log-interval",
              "save-interval", "eval-interval", "eval-iters", "tensor-model-parallel-size",
              "pipeline-model-parallel-size", "expert-model-parallel-size", "recompute-num-layers", "exit-interval",
              "ddp-bucket-size", "save-retain-interval")
    if args.save_retain_interval is not None and (not args.save or not args.save_interval
                                                  or args.save_retain_interval % args.save_interval):
        raise UserError(f"--save-retain-interval {args.save_retain_interval}: needs --save and a --save-interval it "
                        "is a multiple of")
    timeout_minutes(args.distributed_timeout_minutes)  # before the data is read: a bad flag or variable fails at once
    require_directory_or_absent("--save", args.save)
    require_directory_or_absent("--tensorboard-dir", args.tensorboard_dir)
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise UserError(f"--exit-duration-in-mins {args.exit_duration_in_mins}: must be positive")
    from megatron_esft.data.blend import parse_weighted_paths

    args.train_data, args.train_data_weights = parse_weighted_paths(args.train_data, "--train-data")
    if args.valid_data and parse_weighted_paths(args.valid_data, "--valid-data")[1] is not None:
        raise UserError("--valid-data takes paths only: validation reads every document once (weights are for "
                        "--train-data)")
    if args.save_trained_weights_only and args.finetune_mode != "esft":
        raise UserError("--save-trained-weights-only is for --finetune-mode esft (full fine-tuning trains every "
                        "weight)")
    if args.save_trained_weights_only and args.moe_router_bias_update_rate:
        raise UserError("--save-trained-weights-only with --moe-router-bias-update-rate: the router's expert bias "
                        "changes without being a trained parameter, so only full checkpoints keep it")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise UserError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise UserError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if args.ddp_bucket_size is not None and not args.overlap_grad_reduce:
        raise UserError("--ddp-bucket-size needs --overlap-grad-reduce (without it all gradients form one bucket)")
    if args.finetune_mode == "full" and args.expert_config:
        raise UserError("--expert-config is for --finetune-mode esft; --finetune-mode full trains every parameter")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise UserError(f"--lr {args.lr} / --min-lr {args.min_lr}: need 0 <= min-lr <= lr")
    if args.weight_decay < 0 or args.clip_grad < 0:
        raise UserError("--weight-decay and --clip-grad must be non-negative")
    if not 0 <= args.adam_beta1 < 1 or not 0 <= args.adam_beta2 < 1:
        raise UserError("--adam-beta1/--adam-beta2 must be in [0, 1)")
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.train_iters:
        raise UserError(f"--lr-warmup-iters {args.lr_warmup_iters}: must be in 0..--train-iters")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise UserError("--lr-warmup-fraction and --lr-warmup-iters exclude each other (as in Megatron-LM)")
        if not 0 <= args.lr_warmup_fraction < 1:
            raise UserError(f"--lr-warmup-fraction {args.lr_warmup_fraction}: must be in [0, 1)")
    if not 0 <= args.lr_warmup_init <= args.lr:
        raise UserError(f"--lr-warmup-init {args.lr_warmup_init}: must be in 0..--lr ({args.lr})")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise UserError(f"world size {world_size} is not divisible by tensor x pipeline parallel size "
                        f"({args.tensor_model_parallel_size} x {args.pipeline_model_parallel_size})")
    dp = world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {dp}")
    args.data_parallel_size = dp
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.eval_interval and not (args.valid_data or args.split):
        raise UserError("--eval-interval needs --valid-data or --split")
    if args.recompute_modules is not None and args.recompute_granularity != "selective":
        raise UserError("--recompute-modules needs --recompute-granularity selective")
    if args.recompute_modules is not None and "moe_act" in args.recompute_modules and args.experts_impl != "grouped":
        raise UserError("--recompute-modules moe_act needs --experts-impl grouped")
    if args.transformer_impl != "local":
        raise UserError(f"--transformer-impl {args.transformer_impl} is not supported: megatron_esft builds "
                        "Megatron-Core's local layer spec on every machine (docs/troubleshooting.md)")
    if args.flex_attention:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--flex-attention needs a GPU (FlexAttention has no backward on CPU)")
    uncached_fp8 = args.expert_gemm == "fp8" and args.expert_fp8_weight_cache == "none"
    if args.moe_token_counts == "device" and (args.experts_impl != "grouped" or args.moe_permutation != "experts"
                                              or args.expert_model_parallel_size != 1 or uncached_fp8):
        raise UserError("--moe-token-counts device needs --experts-impl grouped, --moe-permutation experts, "
                        "--expert-model-parallel-size 1 and, with --expert-gemm fp8, --expert-fp8-weight-cache "
                        "frozen or all")
    _validate_cuda_graph(args)
    timing.validate(args)
    manual_gc.validate(args)
    profiling.validate(args, world_size)
    weight_checks.validate(args)
    if args.expert_fp8_weight_cache != "frozen" and args.expert_gemm != "fp8":
        raise UserError("--expert-fp8-weight-cache needs --expert-gemm fp8")
    for flag, value in (("--expert-fp8-gemm-kernel", args.expert_fp8_gemm_kernel),
                        ("--expert-fp8-quantizer", args.expert_fp8_quantizer)):
        if value == "triton":
            from megatron_esft.experts import triton_support

            if args.expert_gemm != "fp8":
                raise UserError(f"{flag} needs --expert-gemm fp8")
            if not triton_support.triton_importable():
                raise UserError(f"{flag} triton needs Triton (pip install triton; PyTorch's CUDA wheels bring it)")
    if args.expert_fp8_gemm_config is not None:
        if args.expert_fp8_gemm_kernel != "triton":
            raise UserError("--expert-fp8-gemm-config needs --expert-fp8-gemm-kernel triton")
        from megatron_esft.experts.fp8_triton_gemm import candidates

        if args.expert_fp8_gemm_config not in candidates():
            raise UserError(f"--expert-fp8-gemm-config {args.expert_fp8_gemm_config!r}: not a candidate of the Triton "
                            f"FP8 GEMM; choose from {', '.join(map(repr, candidates()))}")
    if args.offload_frozen_experts and (args.expert_gemm != "fp8" or args.expert_fp8_weight_cache == "none"):
        raise UserError("--offload-frozen-experts needs --expert-gemm fp8 with --expert-fp8-weight-cache frozen or all "
                        "(the GEMMs then read only the FP8 copies of frozen experts)")
    if args.expert_gemm == "fp8":
        import torch

        if args.experts_impl != "grouped":
            raise UserError("--expert-gemm fp8 needs --experts-impl grouped")
        from megatron_esft.experts.fp8 import scaled_grouped_mm_supported

        if not torch.cuda.is_available() or not scaled_grouped_mm_supported(torch.device("cuda")):
            raise UserError("--expert-gemm fp8 needs a GPU of compute capability 9.0 or 10.0 (H100/H200, B200: the "
                            "row-wise scaled kernels of torch._scaled_grouped_mm)")
    if args.bf16:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--bf16 needs a GPU (on CPU, training runs in fp32)")
    return args


def _validate_cuda_graph(args) -> None:
    """Megatron-LM's CUDA-graph flags: only the whole iteration, on a layout whose iteration needs no host sync."""
    if args.cuda_graph_scope is not None and args.cuda_graph_impl == "none":
        raise UserError("--cuda-graph-scope needs --cuda-graph-impl local")
    if args.cuda_graph_impl == "none":
        return
    if args.cuda_graph_impl == "transformer_engine":
        raise UserError("--cuda-graph-impl transformer_engine needs Transformer Engine, which megatron_esft does not "
                        "use; use --cuda-graph-impl local --cuda-graph-scope full_iteration")
    if args.cuda_graph_scope != ["full_iteration"]:
        raise UserError(f"--cuda-graph-scope {' '.join(args.cuda_graph_scope or ['(whole layers)'])}: megatron_esft "
                        "captures only full_iteration (--cuda-graph-impl local --cuda-graph-scope full_iteration)")
    if args.cuda_graph_warmup_steps < 2:
        raise UserError(f"--cuda-graph-warmup-steps {args.cuda_graph_warmup_steps}: must be at least 2 (the first "
                        "eager iteration builds the compiled kernels, the second is checked for host syncs)")
    needs = [flag for flag, bad in (
        ("--moe-token-counts device (host token counts synchronize in every MoE layer)",
         args.moe_token_counts != "device"),
        ("no --flex-attention (its block masks are built on the host per batch)", args.flex_attention),
        ("no --overlap-grad-reduce (its bucket bookkeeping runs in Python per step)", args.overlap_grad_reduce),
        ("--pipeline-model-parallel-size 1", args.pipeline_model_parallel_size != 1),
        # Megatron's RNG tracker sets the CUDA generator's state around sequence-parallel regions and activation
        # recomputes, which a capture refuses (its graph-safe tracker is not used here)
        ("--tensor-model-parallel-size 1", args.tensor_model_parallel_size != 1),
        ("no --recompute-granularity", args.recompute_granularity is not None)) if bad]
    if needs:
        raise UserError(f"--cuda-graph-scope full_iteration needs {'; '.join(needs)}")
