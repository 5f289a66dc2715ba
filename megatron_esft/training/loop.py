"""The fine-tuning loop behind pretrain_esft.py: one readable function, Megatron-Core underneath.

    args -> checks (all user errors before anything is written) -> parallel state -> model (base or resumed weights)
    -> freeze (esft/freeze.py) + hang guard -> DDP + distributed optimizer + LR schedule -> [resume state]
    -> for each iteration: global batch -> forward/backward over micro-batches (Megatron's schedules, any PP)
       -> optimizer step -> log -> eval / keep-best -> save

Loss normalization: the loss of an iteration is the mean over *all* answer tokens of the global batch (each
micro-batch's summed token loss is divided by the global token count, all-reduced over data-parallel ranks before
the forward), so any DP/EP/TP/PP layout and any gradient-accumulation split computes the same gradient.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_esft import parallel as par
from megatron_esft.checkpoint import training_state as ts
from megatron_esft.checkpoint.mcore_checkpoint import HF_ASSETS, SaveStrategy, hf_dtype_name
from megatron_esft.checkpoint.trained_only import base_of
from megatron_esft.errors import RunStopped, UserError
from megatron_esft.esft import freeze
from megatron_esft.esft.expert_config import ModelShape, expert_config_from_json_dict, load_expert_config
from megatron_esft.esft.hang_guard import install_hang_guard
from megatron_esft.models.hf_config import parse_hf_config
from megatron_esft.models.provider import check_parallel_layout
from megatron_esft.training import finite_check, flops, setup, timing, weight_checks
from megatron_esft.training.arguments import build_parser, validate
from megatron_esft.training.cuda_graph import capture_stream, full_iteration_graph, graph_device_for, on_stream
from megatron_esft.training.exit_signal import ExitSignalHandler, exit_requested
from megatron_esft.training.expert_load import ExpertLoadTracker
from megatron_esft.training.log import TrainingLogger
from megatron_esft.training.manual_gc import ManualGC
from megatron_esft.training.profiling import IterationProfiler, MemoryHistory


# ----------------------------------------------------------------------------------------------------- checks
def resolve_run(args):
    """Read the checkpoint to start from and decide: fresh fine-tuning or exact resume. No side effects."""
    iteration, meta = ts.describe_load(args.load, args.ckpt_step)
    base_of(args.load, iteration)  # a trained-only checkpoint's frozen weights must still be there
    source = f"{args.load} (esft_meta.json)"
    cfg = parse_hf_config(meta["hf_config"], source=source)
    shape = ModelShape.from_hf_dict(meta["hf_config"], source=args.load)
    resume = ts.is_training_checkpoint(meta) and not args.finetune  # --finetune: its weights as a new base
    ecfg = None
    if resume:
        saved_mode = meta.get("finetune_mode")
        if saved_mode != args.finetune_mode:
            raise UserError(f"--load {args.load}: checkpoint was trained with --finetune-mode {saved_mode}, "
                            f"not {args.finetune_mode}; resume with the same mode")
        if saved_mode == "esft":
            ecfg = expert_config_from_json_dict(meta["expert_config"], source)
            if args.expert_config:
                given = load_expert_config(args.expert_config, shape)
                if given.to_json_dict() != ecfg.to_json_dict():
                    raise UserError(f"--expert-config {args.expert_config}: differs from the expert config inside "
                                    f"the checkpoint {args.load} (iteration {iteration}); resume needs the same one")
        if iteration >= args.train_iters:
            raise UserError(f"--load {args.load}: checkpoint is at iteration {iteration}, --train-iters is "
                            f"{args.train_iters}: nothing left to train")
        changed = setup.schedule_differences(args, meta["train_state"]["scheduler"])
        if changed and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
            raise UserError(f"--load {args.load}: the schedule differs from the checkpoint's: {', '.join(changed)}; "
                            "pass --override-opt_param-scheduler to continue with this command's, or "
                            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")
    elif args.finetune_mode == "esft":
        if not args.expert_config:
            raise UserError("--finetune-mode esft needs --expert-config (or --finetune-mode full)")
        ecfg = load_expert_config(args.expert_config, shape)
    if ecfg is not None:
        freeze.validate_for_training(ecfg, shape, args.expert_config or source)
    return iteration, meta, cfg, shape, resume, ecfg


def _new_window() -> dict:
    """Sums over the iterations of one logging window: seconds, iterations, loss, real tokens, attended pairs."""
    return {"time": 0.0, "iters": 0, "loss": 0.0, "real": 0.0, "pairs": 0.0}


def _layers_per_stage(model) -> list[int]:
    """Decoder layers each pipeline stage built (a collective over the pipeline group)."""
    from megatron.core import parallel_state as ps

    counts = torch.zeros(ps.get_pipeline_model_parallel_world_size(), dtype=torch.int64)
    counts[ps.get_pipeline_model_parallel_rank()] = len(model.decoder.layers)
    par.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
    return counts.tolist()


def build_data(args):
    from megatron_esft.data import build_sft_datasets, load_tokenizer

    tok_dir = args.tokenizer or os.path.join(args.load, HF_ASSETS)
    tokenizer = load_tokenizer(tok_dir)
    train, valid = build_sft_datasets(args.train_data, valid_data=args.valid_data, split=args.split,
                                      tokenizer=tokenizer, seq_length=args.seq_length, pack=not args.no_pack,
                                      seed=args.seed, template=args.template, train_weights=args.train_data_weights)
    if train.blend is not None:
        par.print_rank0(train.blend.describe(args.train_data))
    return train, valid


# ------------------------------------------------------------------------------------------- forward / loss
def _loss_func(loss_mask, scale, output_tensor):
    loss_sum = (output_tensor.float() * loss_mask).sum()
    report = torch.stack([loss_sum.detach(), loss_mask.sum().to(torch.float32)])
    return loss_sum * scale, {"lm loss": report}


def _forward_step(tracker, scale, data_iterator, model):
    from megatron_esft.data import build_attention_mask, to_device, valid_token_mask

    with timing.timed(model.config.timers, "batch-generator", 2):
        batch = next(data_iterator)
        # non-blocking (the loader pins its batches on a GPU machine): a blocking copy would synchronize the stream
        # at every micro-batch, and the GPU would wait for the host to launch the next forward
        batch = to_device(batch, par.local_device(), attention_mask=False)
    if tracker is not None:
        tracker.set_valid_mask(valid_token_mask(batch))
    output = model(batch["tokens"], batch["position_ids"], build_attention_mask(batch), labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"].float(), scale)


def _run_micro_batches(ddp_model, batches, args, tracker, forward_only, scale):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, tracker, scale),
        data_iterator=iter(batches),
        model=[ddp_model],
        num_microbatches=len(batches),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


def _global_loss(reports) -> tuple[float, float]:
    """(mean loss, tokens) over the world from this rank's per-micro-batch [sum, tokens] reports."""
    total = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        total += report["lm loss"].detach().cpu().to(torch.float64)
    if dist.is_initialized():
        par.all_reduce(total)  # TP/duplicate stages scale sum and count alike: the ratio is exact
    return float(total[0] / total[1].clamp_min(1)), float(total[1])


def evaluate(ddp_model, valid, args, tracker):
    from megatron_esft.data import eval_batches

    ddp_model.eval()
    batches = list(eval_batches(valid, args.micro_batch_size))
    if args.eval_iters:
        batches = batches[: args.eval_iters]
    with tracker.separate_table():  # training counts not yet logged stay out of the validation routing
        with torch.no_grad():
            reports = _run_micro_batches(ddp_model, batches, args, tracker, True, 1.0)
        counts = tracker.reduce()
    ddp_model.train()
    loss, _ = _global_loss(reports)
    return loss, counts


# ------------------------------------------------------------------------------------------------ the loop
def pretrain(argv=None) -> int:
    start_time = time.time()  # --exit-duration-in-mins counts from here, as Megatron-LM's _TRAIN_START_TIME
    args = build_parser().parse_args(argv)
    validate(args, par.world_size())
    start_iteration, meta, cfg, shape, resume, ecfg = resolve_run(args)
    parallel = par.ParallelConfig.from_args(args)
    check_parallel_layout(cfg, parallel)
    train_ds, valid_ds = build_data(args)
    if args.eval_interval and valid_ds is None:
        raise UserError("--eval-interval: the validation set is empty")
    setup.initialize_parallel(parallel, seed=args.seed)
    memory_history = MemoryHistory(args, dist.get_rank())
    memory_history.start()  # before the model: every allocation of the run is in the history
    from megatron.core import parallel_state as ps

    from megatron_esft.data import SFTDataLoader, valid_token_mask
    from megatron_esft.experts import note_expert_weights_updated

    model = setup.build_trainable_model(args, cfg, parallel)
    if not resume:
        ts.load_model_only(args.load, start_iteration, model)
        if ts.is_training_checkpoint(meta):
            par.print_rank0(f"--finetune: model weights of {args.load} at iteration {start_iteration}; "
                            "new run from iteration 0")
    freeze.apply_finetune_mode(model, args.finetune_mode, ecfg)
    if args.expert_gemm != "bf16":  # after freezing: set_trainable_experts rebuilds the expert Parameters
        from megatron_esft.experts.spec import set_expert_gemm_backend

        set_expert_gemm_backend(model, args.expert_gemm, args.expert_fp8_weight_cache)
        if args.expert_gemm == "fp8":
            from megatron_esft.experts.fp8 import set_fp8_gemm_kernel, set_fp8_quantizer

            set_fp8_gemm_kernel(args.expert_fp8_gemm_kernel)
            set_fp8_quantizer(args.expert_fp8_quantizer)
            if args.expert_fp8_gemm_config:
                from megatron_esft.experts import fp8_triton_gemm

                fp8_triton_gemm.pin_config(args.expert_fp8_gemm_config)
    if args.moe_token_counts != "host":
        from megatron_esft.experts.spec import device_counts_copy_bytes, set_expert_token_counts

        set_expert_token_counts(model, args.moe_token_counts)
        par.print_rank0(f"token counts on the device: the trained experts' weights are held twice, "
                        f"{device_counts_copy_bytes(model) / 2**20:.2f} MiB more on this rank")
    first = freeze.first_trainable_layer_number(ecfg, args.finetune_mode, shape.moe_layer_keys)
    install_hang_guard(model, first)
    from megatron_esft.models.fusions import describe

    par.print_rank0(describe(model))
    if parallel.pp > 1:
        par.print_rank0(f"pipeline stages: {', '.join(map(str, _layers_per_stage(model)))} decoder layers")
    report = freeze.count_trainable(model, cfg.num_layers)
    for line in report.lines():
        par.print_rank0(line)
    graph_device = graph_device_for(args)
    graph_stream = capture_stream(graph_device) if graph_device is not None else None
    with on_stream(graph_stream):  # DDP's gradient-accumulation nodes run on the stream they were made on
        ddp_model = setup.wrap_ddp(model, args.overlap_grad_reduce, args.overlap_param_gather, args.ddp_bucket_size)
    optimizer = setup.build_optimizer(args, ddp_model)
    scheduler = setup.build_scheduler(args, optimizer)
    setup.configure_schedule_hooks(ddp_model, optimizer)
    timers = timing.install(args, ddp_model, optimizer)

    loader = SFTDataLoader(train_ds, args.micro_batch_size)
    iteration, best_loss, base_load, last_saved = 0, None, None, None
    async_queue = None
    # one writer for all of the run's saves (--ckpt-assume-constant-structure keeps its plan from save to save)
    save_strategy = SaveStrategy(args.ckpt_fully_parallel_save, args.ckpt_assume_constant_structure)
    if args.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()
    if resume:
        state = meta["train_state"]
        same_world = meta.get("world_size") == dist.get_world_size()
        # Megatron-LM's --no-load-optim / --no-load-rng, or a checkpoint saved with --no-save-optim / --no-save-rng
        load_optim, load_rng = (not flag and meta.get(f"{part}_saved", True)
                                for flag, part in ((args.no_load_optim, "optimizer"), (args.no_load_rng, "rng")))
        ts.load_training_checkpoint(args.load, start_iteration, model, optimizer, restore_rng=same_world and load_rng,
                                    step=int(meta["optimizer_step"]), load_optimizer=load_optim)
        if args.fused_adam:
            setup.use_fused_adam(optimizer)  # the loaded param groups carry the checkpoint's flags
        if not same_world:
            par.print_rank0(f"note: checkpoint written by {meta.get('world_size')} ranks; RNG states not restored")
        # (at another world size the note above said it already)
        skipped = [what for loaded, what in ((load_optim, "optimizer state not loaded (Adam starts afresh)"),
                                             (load_rng or not same_world, "RNG states not restored")) if not loaded]
        if skipped:
            par.print_rank0("note: " + "; ".join(skipped))
        setup.load_scheduler_state(scheduler, state["scheduler"])
        loader.load_state_dict(state["data"])
        iteration, best_loss = start_iteration, state.get("best_validation_loss")
        base_load = torch.tensor(state["base_expert_load"], dtype=torch.float64) if state.get("base_expert_load") \
            else None
        par.print_rank0(f"resumed from {args.load} at iteration {iteration} "
                        f"(consumed samples {loader.consumed_samples})")

    if args.offload_frozen_experts:  # after any checkpoint load: the loaded values are quantized on the device
        from megatron_esft.experts import offload_frozen_expert_weights

        moved, cached = offload_frozen_expert_weights(model)
        par.print_rank0(f"frozen expert weights moved to host memory: {moved / 2**30:.3f} GiB per rank "
                        f"(their FP8 copies on the device: {cached / 2**30:.3f} GiB)")
    # the frozen weights as loaded (and offloaded): compared before every save, at the end and at the interval
    frozen_check = weight_checks.FrozenWeightsCheck(model, args.check_frozen_weights and args.finetune_mode != "full",
                                                    args.check_frozen_weights_interval)
    tracker = ExpertLoadTracker(model, cfg.num_layers, cfg.n_routed_experts)
    selected = {int(k): list(v) for k, v in ecfg.experts.items()} if ecfg is not None else None
    graph = full_iteration_graph(  # None without --cuda-graph-impl local
        args, model, lambda batches, scale: _run_micro_batches(ddp_model, batches, args, tracker, False, scale),
        graph_device, graph_stream)
    logger = TrainingLogger(args.tensorboard_dir, selected)
    logger.scalar("trainable-params", report.total, iteration)
    logger.trainable_table(report, iteration)
    hf_assets = os.path.join(args.load, HF_ASSETS)

    def save(root, it):
        train_state = {"iteration": it, "consumed_samples": loader.consumed_samples, "data": loader.state_dict(),
                       "scheduler": scheduler.state_dict(), "best_validation_loss": best_loss,
                       "base_expert_load": base_load.tolist() if base_load is not None else None}
        out_meta = {
            "hf_config": meta["hf_config"],
            "params_dtype": hf_dtype_name(torch.bfloat16 if args.bf16 else torch.float32),
            "hf_dtypes": meta.get("hf_dtypes", {}),
            "kind": args.finetune_mode,
            "finetune_mode": args.finetune_mode,
            "expert_config": ecfg.to_json_dict() if ecfg is not None else None,
            # the weights this run started from (with --finetune: the training checkpoint it loaded)
            "base_checkpoint": meta["base_checkpoint"] if resume else {"load": os.path.abspath(args.load),
                                                                       "iteration": start_iteration},
            "saved_parallel": {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp,
                               "dp": ps.get_data_parallel_world_size()},
            "trainable_params": report.total,
            "train_state": train_state,
        }
        guarded(frozen_check.check, it,
                stopped=lambda: f"the checkpoint of iteration {it} was not written ({kept()})")
        t0 = time.perf_counter()

        def published():  # the iteration is complete on disk and the latest (with --async-save: some steps later)
            nonlocal last_saved
            par.print_rank0(f"saved checkpoint at iteration {it:7d} to {root} ({time.perf_counter() - t0:.1f} s"
                            f"{', in the background' if async_queue is not None else ''})")
            if root == args.save:
                last_saved = f"iteration {it} in {root}"

        base = out_meta["base_checkpoint"]  # never removed by the retention below: it may hold the frozen weights
        protected = frozenset([base["iteration"]] if os.path.abspath(base["load"]) == os.path.abspath(root) else [])
        with setup.parameters_gathered(ddp_model):
            ts.save_training_checkpoint(root, it, model, optimizer, out_meta,
                                        hf_assets if os.path.isdir(hf_assets) else None, async_queue, published,
                                        trained_only=args.save_trained_weights_only,
                                        strategy=save_strategy,
                                        retain_interval=args.save_retain_interval if root == args.save else 0,
                                        protected=protected, save_optimizer=not args.no_save_optim,
                                        save_rng=not args.no_save_rng)
        if async_queue is not None:
            par.print_rank0(f"scheduled checkpoint save at iteration {it:7d} to {root} "
                            f"({time.perf_counter() - t0:.1f} s blocking)")

    def finish_saves():
        if async_queue is not None:
            async_queue.maybe_finalize_async_calls(blocking=True)

    def last_checkpoint():
        return last_saved or (f"iteration {start_iteration} in {args.load}" if resume else None)

    def kept():
        return f"last checkpoint: {last_checkpoint()}" if last_checkpoint() else "this run saved no checkpoint"

    def wind_down():  # before a stop: what was traced, saved and logged up to here stays usable
        profiler.close()  # a trace of the window so far
        collector.stop()
        finish_saves()
        logger.close()  # readable in TensorBoard

    def stop_non_finite(what):
        wind_down()
        return finite_check.stopped(iteration + 1, what, last_checkpoint())

    def guarded(check, *check_args, stopped=lambda: f"stopped ({kept()})"):
        """A failed weight check stops the run like a non-finite loss; `stopped()` (what the stop keeps) is
        added to the message after the wind-down, which may publish a pending --async-save."""
        try:
            check(*check_args)
        except RunStopped as exc:
            wind_down()
            raise RunStopped(f"{exc}; {stopped()}") from None

    def run_eval(it):
        nonlocal best_loss, base_load
        with setup.parameters_gathered(ddp_model), collector.evaluation(), timing.paused(ddp_model):
            loss, counts = evaluate(ddp_model, valid_ds, args, tracker)
        if base_load is None and it == 0:
            base_load = counts
        logger.validation(it, loss, counts, base_load)
        if it > 0 and (best_loss is None or loss < best_loss):
            best_loss = loss
            if args.save and not args.no_keep_best:
                save(os.path.join(args.save, "best"), it)

    def check_weights(it):
        interval = args.check_weight_hash_across_dp_replicas_interval
        if interval and it % interval == 0:
            with setup.parameters_gathered(ddp_model):
                guarded(weight_checks.check_replicas, model, it)
        if frozen_check.due(it):
            guarded(frozen_check.check, it)

    collector = ManualGC(args)
    if collector.enabled:
        par.print_rank0(collector.describe())
    collector.start()
    if valid_ds is not None and args.eval_interval and not resume:
        run_eval(0)  # the base model's validation loss and routing: the reference for the drift

    signals = ExitSignalHandler(args.exit_signal_handler)
    ddp_model.train()
    window = _new_window()
    trained_weights = flops.TrainedWeights.from_expert_config(ecfg if args.finetune_mode == "esft" else None)
    report_memory = True  # Megatron-LM prints the memory line once, after the first logged iteration
    profiler = IterationProfiler(args, dist.get_rank(), iteration, announce=partial(print, flush=True))
    while iteration < args.train_iters:
        profiler.begin(iteration + 1)
        batches = [next(loader) for _ in range(args.num_micro_batches)]
        # over the data-parallel group: answer tokens (the loss's normalizer), real tokens, attended pairs
        batch_counts = torch.tensor([float(sum(b["loss_mask"].sum() for b in batches)),
                                     float(sum(valid_token_mask(b).sum() for b in batches)),
                                     float(sum(flops.attended_pairs(b["document_ids"]) for b in batches))
                                     if args.log_throughput else 0.0], dtype=torch.float64)
        par.all_reduce(batch_counts, group=ps.get_data_parallel_group())
        answer_tokens, real_tokens, pairs = batch_counts.tolist()
        scale = args.num_micro_batches * ps.get_data_parallel_world_size() / max(answer_tokens, 1.0)
        t0 = time.perf_counter()
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        if graph is None:
            reports = _run_micro_batches(ddp_model, batches, args, tracker, False, scale)
        else:
            announce = not graph.captured
            reports = graph(batches, scale)
            if announce and graph.captured:
                par.print_rank0(f"captured the training iteration in a CUDA graph at iteration {iteration + 1} "
                                f"(its memory pool: {graph.pool_gib():.2f} GiB); later iterations replay it")
        loss, _ = _global_loss(reports)
        if args.check_for_nan_in_loss_and_grad and not math.isfinite(loss):
            raise stop_non_finite(f"lm loss is {loss}")
        try:
            with timing.timed(timers, "optimizer", 1, args.barrier_with_L1_time):
                _, grad_norm, num_zeros = optimizer.step()
        except finite_check.NonFiniteGradNorm as exc:
            raise stop_non_finite(f"{exc} (lm loss {loss:.6E})") from None
        note_expert_weights_updated(model)  # FP8 caches of trained experts: the optimizer bypasses their versions
        scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        iteration += 1
        window["time"] += time.perf_counter() - t0
        window["iters"] += 1
        window["loss"] += loss
        window["real"] += real_tokens
        window["pairs"] += pairs
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            counts = tracker.reduce()
            throughput = flops.tflops_per_gpu(
                cfg, trained_weights, tokens=window["iters"] * args.global_batch_size * args.seq_length,
                pairs=window["pairs"], expert_load=counts, seconds=window["time"],
                world_size=dist.get_world_size()) if args.log_throughput else None
            logger.train_line(
                iteration=iteration, train_iters=args.train_iters, consumed=loader.consumed_samples,
                ms_per_iter=1000.0 * window["time"] / window["iters"],
                lr=scheduler.get_lr(optimizer.param_groups[0]) if optimizer.param_groups else args.lr,
                gbs=args.global_batch_size, loss=window["loss"] / window["iters"],
                grad_norm=float(grad_norm or 0.0), trainable=report.total,
                tokens_per_s=window["real"] / max(window["time"], 1e-9), throughput=throughput,
                num_zeros=float(num_zeros) if args.log_num_zeros_in_grad else None,
                params_norm=setup.params_l2_norm(optimizer) if args.log_params_norm else None)
            logger.expert_load(counts, iteration)
            logger.memory(iteration, print_line=report_memory, to_tensorboard=args.log_memory_to_tensorboard)
            if report_memory:
                setup.log_autotuned_fp8_gemms(args)
            memory_history.dump()
            timing.log(timers, args, logger.writer, iteration, window["iters"])
            report_memory = False
            window = _new_window()
        check_weights(iteration)  # after the iteration's log line: a stop here still shows its loss
        if valid_ds is not None and args.eval_interval and iteration % args.eval_interval == 0:
            run_eval(iteration)
        requested, timed_out_after = exit_requested(signals, args, start_time)  # a collective when enabled
        stop = bool(args.exit_interval and iteration % args.exit_interval == 0) or requested
        if requested and iteration < args.train_iters:
            par.print_rank0(f"exiting program after {timed_out_after} minutes" if timed_out_after is not None
                            else f"exit signal received: saving at iteration {iteration} and exiting")
        if args.save and (iteration == args.train_iters or stop
                          or (args.save_interval and iteration % args.save_interval == 0)):
            save(args.save, iteration)
        if async_queue is not None:
            async_queue.maybe_finalize_async_calls(blocking=False)  # a collective: publishes finished saves
        collector.after_iteration(iteration)
        profiler.end(iteration)
        if stop:
            break
    guarded(frozen_check.check, iteration, stopped=lambda: f"stopped at the end of training ({kept()})")
    profiler.close()
    collector.stop()
    finish_saves()
    if frozen_check.summary():
        par.print_rank0(frozen_check.summary())
    if async_queue is not None:
        async_queue.close()
    signals.restore()
    tracker.remove()
    logger.close()
    if best_loss is not None:
        par.print_rank0(f"best validation loss {best_loss:.6E}")
    par.destroy()
    return 0
