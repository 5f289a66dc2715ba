"""GPU benchmark: ESFT vs full fine-tuning of a DeepSeek-V2-Lite-shaped model, bf16 vs FP8 expert GEMMs.

    python bench/gpu_esft.py                      # correctness checks + expert and model benchmarks (one H100)
    python bench/gpu_esft.py --only check,experts # a subset (check, gemm, experts, model); --tiny runs the same
                                                  # code at toy size (CPU works)

Model: DeepSeek-V2-Lite's shapes (27 layers, hidden 2048, MLA with kv_lora_rank 512, 16 heads, 64 routed + 2 shared
experts of ffn 1408, top-6, vocab 102400; layer 0 dense) with random weights, built by `models.provider.build_model`
(Megatron-Core GPTModel, local spec + torch SDPA attention: no Transformer Engine on the machine) with the
frozen-aware grouped experts. ESFT trains 6 of 64 routed experts per MoE layer (random ids, ~10 %), everything else
frozen via `esft.freeze.apply_finetune_mode` (the trainer's own code); full fine-tuning (FFT) trains everything.
Optimizer: Megatron-Core DDP (fp32 grad buffers) + distributed optimizer (Adam, fp32 main weights and states; torch's
fused AdamW kernel as in the trainer, except for `"fusions": "none"` jobs), i.e. bf16 weights for everything and 16
extra bytes per *trainable* parameter.

Each configuration runs in its own process (clean peak memory, an OOM is reported, not fatal): `--warmup` steps,
then `--iters` steps timed with CUDA events (median). Reported: time/iteration, tokens/s, model TFLOP/s and peak
allocated memory. Model FLOPs count useful work only, as the trainer's --log-throughput (training/flops.py): forward
of every layer; dgrad only where a gradient has to flow (above the first trainable layer, plus fc2 dgrad of
trainable experts inside it); wgrad only for trainable weights; the trained experts' rows counted by hooks on the
experts in the timed steps; causal attention counts the lower triangle (scores and PV: 2·s·(s+1)/2 MACs per
head-dim), per document for packed jobs (`"doc_len": N`: documents of random length around N with per-document
causal masks, as the trainer feeds packed SFT data); embedding lookups 0. `"offload": true` keeps the frozen
experts' bf16 weights in host memory (FP8 with a weight cache; the trainer's --offload-frozen-experts).
`"permutation"` picks the MoE token permutation ("experts", the default: the grouped experts permute; "gather": the
dispatcher's gather permutation; "megatron": Megatron-Core's own). `"token_counts": "device"` keeps the experts'
token counts on the GPU (the trainer's --moe-token-counts device: no host sync per MoE layer).
`"manual_gc": true`: Python's automatic garbage collection off during the steps (the trainer's --manual-gc).
`"cuda_graphs": "full_iteration"` (with "token_counts": "device"; the trainer's --cuda-graph-impl local
--cuda-graph-scope full_iteration, training/cuda_graph.py): every micro-batch's forward and backward captured in one
CUDA graph in the last warm-up step (at least 3: eager, eager under the host-sync check, capture), then replayed
(the timed steps are replays; the optimizer step stays eager). `"cuda_graphs": "layers"` (an experiment, GPU only,
with "token_counts": "device"): Megatron-Core's own per-layer CUDA graphs (`cuda_graph_impl="local"`, whole layers),
the layers below the first trainable one eager; module hooks do not run when a graph replays, so the trained rows are
counted as the expected share.
`"memory_cap_gib": X` caps what torch's caching allocator may reserve on the GPU at X GiB
(`torch.cuda.set_per_process_memory_fraction`; 78.5 stands for an H100 80 GB: its 79.2 GiB less the CUDA context),
so a job on a larger GPU says whether it fits on a smaller one: beyond the cap the allocator frees its cached blocks,
then raises OOM, as on the smaller card (the graph's private pool included); no effect without CUDA.
`"memory_trace": true` records torch's allocator history over one iteration (the graph's capture, or the last
warm-up step) and reports what held the memory at its peak, by allocation site (bench/_gpu_memory.py).
`"fp8_kernel": "triton"` (experts and model jobs) runs the FP8 experts' GEMMs through the Triton kernel of
experts/fp8_triton_gemm.py instead of torch's `_scaled_grouped_mm`; `"fp8_quantizer": "triton"` their
activation quantizers through the hand-written kernels of experts/fp8_triton_quantize.py. The `gemm` job times the
layer's grouped GEMMs alone (bf16, torch's FP8, Triton's FP8; `"tokens"` as in an experts job): the FP8 GEMMs' own speedup, and with
`"candidates": true` each of the Triton kernel's autotuning candidates launched explicitly (tiles, pointer or TMA
loads; a list of labels such as "TMA 64x128x128 w4 s4" times those only); it also times the FP8 experts'
quantization kernels alone, torch.compile's and the hand-written ones, against a copy of as many bytes
(bench/_gpu_quantizers.py).
`--profile` (or `"profile": true` in a job) also sums the GPU kernel time by kind (GEMMs, attention, fused, ...),
counts the host syncs of a step and says where the host's time goes (bench/_host_profile.py: host ms and aten ops
per phase, per module class in forward, per autograd node in backward).
After the timed steps the frozen parameters are fingerprinted (exact integer hash of their bits) against the values
before training: they must be bit-identical, and the trainable experts must have changed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _gpu_experts import TRAINABLE_PER_LAYER, init_parallel, run_check, run_experts  # noqa: E402 (bench/ on sys.path)
from _gpu_gemm import run_gemm  # noqa: E402
from _gpu_jobs import cap_device_memory, default_plan, job_problem  # noqa: E402
from _gpu_memory import record_iteration  # noqa: E402
from _gpu_report import print_tables  # noqa: E402
from _host_profile import format_host_profile, host_profile  # noqa: E402
from _gpu_timing import (NullCtx, PhaseTimer, Timer, count_host_syncs, peak_gib, peak_reserved_gib,  # noqa: E402
                         profile_kernels)

from megatron_esft.training.weight_checks import fingerprints as fingerprint  # noqa: E402 (the trainer's check)

V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "n_group": 1,
    "topk_group": 1, "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001, "seq_aux": True, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
}
TINY = dict(V2_LITE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
            num_experts_per_tok=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


# --------------------------------------------------------------------------------------------- model timing
def run_model(args, raw, mode, backend, layers, cache, recompute, mbs, accum=1, fusions="auto", doc_len=0,
              permutation="experts", offload=False, token_counts="host", cuda_graphs=None, manual_gc=False,
              memory_trace=False):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_esft.esft.expert_config import ExpertConfig
    from megatron_esft.esft.freeze import apply_finetune_mode, decoder_layers, is_moe_layer
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.training.manual_gc import ManualGC

    init_parallel(seed=5)
    raw = dict(raw, num_hidden_layers=layers)
    cfg = parse_hf_config(raw)
    overrides = {}
    if recompute == "full":
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute.startswith("block:"):  # recompute the first N layers of the block, keep the rest's activations
        overrides = dict(recompute_granularity="full", recompute_method="block",
                         recompute_num_layers=int(recompute.split(":")[1]))
    elif recompute.startswith("selective"):  # "selective" (Megatron's default: core_attn) or "selective:moe,layernorm"
        overrides = dict(recompute_granularity="selective")
        if ":" in recompute:
            overrides["recompute_modules"] = recompute.split(":", 1)[1].split(",")
    cuda_graphs = "layers" if cuda_graphs is True else (cuda_graphs or None)  # `true`: the experiment's old key
    if cuda_graphs == "layers":
        # experiment: Megatron-Core's own per-layer CUDA graphs (Megatron-LM's --cuda-graph-impl local, whole layers),
        # possible for MoE layers once nothing in them synchronizes with the host ("token_counts": "device"); its
        # graph manager needs an RNG tracker that can be captured
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(5, use_cudagraphable_rng=True, force_reset_rng=True)
        overrides["cuda_graph_impl"] = "local"
    t0 = time.perf_counter()
    model = build_model(cfg, params_dtype=torch.bfloat16, experts="grouped", config_overrides=overrides,
                        fusions=fusions, moe_permutation=permutation)
    build_s = time.perf_counter() - t0
    n = raw["n_routed_experts"]
    gen = torch.Generator().manual_seed(7)
    selection = {str(k): sorted(torch.randperm(n, generator=gen)[:TRAINABLE_PER_LAYER].tolist()) for k in cfg.moe_layers}
    apply_finetune_mode([model], "full" if mode == "fft" else "esft", ExpertConfig(experts=selection))
    from megatron_esft.models.fusions import describe

    fused = describe(model).split(": ", 1)[1]  # after freezing: the fused loss applies to a frozen output layer only
    if recompute != "none" and mode == "esft":
        # Megatron's recompute is an autograd.Function over the layer's (or MoE block's, norm's) *inputs*: with a
        # frozen embedding no input requires grad and the checkpointed trainable experts would get no gradient. The
        # trainer's hang guard makes the right input require grad (it reads the recompute settings from the config;
        # with full recompute the decoder input: the dgrad of the layers below).
        from megatron_esft.esft.hang_guard import install_hang_guard

        install_hang_guard([model], min(cfg.moe_layers) + 1)
    if cuda_graphs == "layers":
        # layers below the first one with trainable weights run no backward (nothing in them or below needs a
        # gradient); Megatron's manager would wait for it before their next forward: they stay eager
        for number, layer in decoder_layers([model]):
            if any(p.requires_grad for p in layer.parameters()):
                break
            if hasattr(layer, "cudagraph_manager"):
                del layer.cudagraph_manager
    # layer number -> rows routed to its trainable experts, added up in place on the counts' device (no host sync per
    # layer with "token_counts": "device"; a whole-iteration graph replays the additions; read after the timed steps)
    trained_rows, hooks, counting, index_of = {}, [], [False], {}
    for number, layer in decoder_layers([model]):
        if not is_moe_layer(layer):
            continue
        experts = layer.mlp.experts

        def hook(module, inputs, number=number):
            if not counting[0]:
                return  # activation recomputation inside backward is not useful work
            ids = module.trainable_local_experts
            if ids:
                counts = inputs[1]
                key = (number, counts.device)
                if key not in index_of:  # made once: a host-to-device copy in every step would synchronize
                    index_of[key] = torch.tensor(ids).to(counts.device)
                if number not in trained_rows:
                    trained_rows[number] = torch.zeros((), dtype=counts.dtype, device=counts.device)
                trained_rows[number] += counts.index_select(0, index_of[key]).sum()

        hooks.append(experts.register_forward_pre_hook(hook))
    from megatron_esft.experts import note_expert_weights_updated, set_expert_gemm_backend

    set_expert_gemm_backend([model], backend, cache)
    if token_counts != "host":  # the trainer's --moe-token-counts
        from megatron_esft.experts import set_expert_token_counts

        set_expert_token_counts([model], token_counts)
    offloaded_gib = 0.0
    if offload:  # the trainer's --offload-frozen-experts: only the FP8 copies of frozen experts stay on the GPU
        from megatron_esft.experts import offload_frozen_expert_weights

        offloaded_gib = offload_frozen_expert_weights([model])[0] / 2**30
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False
    from megatron_esft.training.cuda_graph import capture_stream, on_stream

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # the trainer's: DDP's kept gradient-accumulation nodes are made on the stream the whole-iteration graph runs on
    graph_stream = capture_stream(dev) if cuda_graphs == "full_iteration" else None
    with on_stream(graph_stream):
        ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True, bucket_size=None))
    from megatron_esft.compat import use_torch_adam

    use_torch_adam()  # the trainer's optimizer, also where TE or apex import
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.0, bf16=True, params_dtype=torch.bfloat16,
        use_distributed_optimizer=True, clip_grad=1.0), [ddp])
    if fusions != "none":  # the trainer's default: torch's fused AdamW (training/setup.use_fused_adam)
        from megatron_esft.training.setup import use_fused_adam

        use_fused_adam(optimizer)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    before_frozen, before_trained = fingerprint(frozen), fingerprint(trained)
    n_trainable = sum(p.numel() for p in trained)
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, raw["vocab_size"], (mbs, args.seq), generator=g).to(dev)
    labels = torch.randint(0, raw["vocab_size"], (mbs, args.seq), generator=g).to(dev)
    position_ids = torch.arange(args.seq, device=dev).unsqueeze(0).expand(mbs, -1)
    attention_mask, pairs = None, None
    if doc_len:  # packed SFT data: documents of random lengths (mean doc_len), per-document causal masks + positions
        from megatron_esft.data import build_attention_mask

        lengths = []
        while sum(lengths) < args.seq:
            lengths.append(int(torch.randint(doc_len // 2, doc_len * 3 // 2 + 1, (1,), generator=g)))
        lengths[-1] -= sum(lengths) - args.seq
        document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        attention_mask = build_attention_mask(document_ids.to(dev).expand(mbs, -1))
        position_ids = torch.cat([torch.arange(n) for n in lengths]).to(dev).unsqueeze(0).expand(mbs, -1)
        pairs = sum(n * (n + 1) / 2 for n in lengths)
    timer, phases = Timer(), PhaseTimer()
    losses = []
    graph, warmup = None, args.warmup
    if cuda_graphs == "full_iteration":  # the trainer's FullIterationGraph: captured at the last warm-up step
        from megatron_esft.training.cuda_graph import FullIterationGraph

        def iteration(batches, scale):
            out = []
            for b in batches:
                counting[0] = True
                loss = ddp(b["tokens"], b["position_ids"], attention_mask, labels=b["labels"]).float().mean()
                counting[0] = False
                loss.backward()
                out.append(loss.detach())
            return out

        # eager, watched, ..., then the capture in the last warm-up step: the timed steps are replays only
        warmup = max(args.warmup, 3)
        graph = FullIterationGraph(iteration, warmup - 1, dev, graph_stream)
        batches = [{"tokens": tokens, "position_ids": position_ids, "labels": labels}] * accum
    # the trainer's --manual-gc (no collections between steps): Python's automatic collections off in the steps
    collector = ManualGC(argparse.Namespace(manual_gc=manual_gc, manual_gc_interval=0, manual_gc_eval=False))
    collector.start()

    def forward_backward():
        if graph is not None:
            loss = graph(batches, 1.0)[-1]
            phases.mark("forward + backward (one graph)")
            return loss
        for _ in range(accum):  # gradient accumulation: grads add up in DDP's fp32 buffers, one optimizer step
            counting[0] = True
            loss = ddp(tokens, position_ids, attention_mask, labels=labels).float().mean()
            counting[0] = False
            phases.mark("forward")
            loss.backward()
            phases.mark("backward")
        return loss

    memory_trace_peak = None
    for it in range(warmup + args.iters):
        if it == warmup:
            for rows in trained_rows.values():
                rows.zero_()
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        with (timer if it >= warmup else NullCtx()):
            phases.start(record=it >= warmup)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            if memory_trace and it == warmup - 1:  # the graph's capture, or the eager jobs' last warm-up step
                loss, memory_trace_peak = record_iteration(forward_backward)
            else:
                loss = forward_backward()
            ddp.finish_grad_sync()
            optimizer.step()
            note_expert_weights_updated([model])  # as the trainer: keeps a "cache": "all" job's FP8 copies current
            if cuda_graphs == "layers":  # after the first step (Megatron's schedules call it at the end of each)
                from megatron.core.transformer.cuda_graphs import create_cudagraphs

                create_cudagraphs()
            phases.mark("optimizer")
        phases.finish()
        losses.append(loss.item())
    collector.stop()
    peak, reserved = peak_gib(), peak_reserved_gib()
    pool_gib = graph.pool_gib() if graph is not None else None  # as the trainer's capture line reports it
    # useful FLOPs as the trainer's --log-throughput counts them (training/flops.py), with the trained rows counted
    # by the hooks; causal attention over the whole sequence unless packed documents were given
    from megatron_esft.training.flops import TrainedWeights, iteration_flops

    what_trains = TrainedWeights() if mode == "fft" else TrainedWeights({int(k): v for k, v in selection.items()})
    per_sequence = args.seq * (args.seq + 1) // 2 if pairs is None else pairs
    flops = iteration_flops(cfg, what_trains, tokens=args.seq * mbs * accum, pairs=per_sequence * mbs * accum,
                            trained_rows={number - 1: float(t) / args.iters for number, t in trained_rows.items()})
    t_check = time.perf_counter()
    after_frozen = fingerprint(frozen)  # what the trainer's frozen-weights check costs at every save
    check_s = time.perf_counter() - t_check
    after_trained = fingerprint(trained)
    ms = timer.median_ms()
    row = {"kind": "model", "mode": mode, "backend": backend, "cache": cache, "layers": layers, "seq": args.seq,
           "token_counts": token_counts, "cuda_graphs": cuda_graphs, "manual_gc": manual_gc,
           "graph_captured": graph is not None and graph.captured,
           "mbs": mbs, "accum": accum, "recompute": recompute, "fusions": fused, "doc_len": doc_len,
           "offloaded_gib": offloaded_gib, "memory_trace": memory_trace_peak, "graph_pool_gib": pool_gib, "ms": ms,
           "tokens_per_s": accum * mbs * args.seq / ms * 1e3,
           "tflops": flops / ms / 1e9, "peak_gib": peak, "reserved_gib": reserved,
           "trainable_params": n_trainable, "frozen_tensors": len(frozen),
           "frozen_bit_identical": bool(torch.equal(before_frozen, after_frozen)),
           "trainable_changed": f"{int((before_trained != after_trained).sum())}/{len(trained)}",
           "loss_first": losses[0], "loss_last": losses[-1], "build_s": build_s, "frozen_check_s": check_s,
           "phases": phases.medians()}
    if args.profile:
        def forward():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            return ddp(tokens, position_ids, attention_mask, labels=labels).float().mean()

        def finish_step():
            ddp.finish_grad_sync()
            optimizer.step()
            note_expert_weights_updated([model])

        def step():
            if graph is not None:  # the replayed graph's kernels and host syncs (the optimizer's, outside it)
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                graph(batches, 1.0)
            else:
                forward().backward()
            finish_step()
        # the measurements so far, in case a diagnostic below runs past the job's time limit (the orchestrator
        # keeps the last RESULT line a job printed)
        print("RESULT " + json.dumps([row]), flush=True)
        kernel_ms = profile_kernels(f"model {mode} {backend} {layers}L", step, steps=1)
        row["gpu_kernel_ms"] = kernel_ms if accum == 1 else None
        row["host_syncs"] = count_host_syncs(step)
        try:  # a diagnostic: the job's measurements above stay whatever happens here
            if graph is not None:
                raise RuntimeError("not for a replayed graph (no per-module host work left)")
            row["host_profile"] = host_profile(forward, lambda loss: loss.backward(), finish_step)
            print(f"HOST PROFILE model {mode} {backend} {layers}L\n{format_host_profile(row['host_profile'])}",
                  file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"HOST PROFILE failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return [row]


# ---------------------------------------------------------------------------------------------- orchestration
def run_job(args, job):
    raw = TINY if args.tiny else V2_LITE
    cap_device_memory(job.get("memory_cap_gib"))
    if job["job"] == "check":
        return run_check(args, raw)
    if job["job"] == "gemm":  # the layer's grouped GEMMs alone: bf16 against torch's and the Triton FP8 kernel
        return run_gemm(argparse.Namespace(**dict(vars(args), tokens=job.get("tokens", args.tokens),
                                                  candidates=job.get("candidates", False))), raw)
    from megatron_esft.experts.fp8 import set_fp8_gemm_kernel, set_fp8_quantizer

    # "triton": the FP8 experts' GEMMs through experts/fp8_triton_gemm.py, their activation quantizers through the
    # hand-written kernels of experts/fp8_triton_quantize.py
    set_fp8_gemm_kernel(job.get("fp8_kernel", "torch"))
    set_fp8_quantizer(job.get("fp8_quantizer", "inductor"))
    if job["job"] == "experts":  # "tokens": N overrides --tokens (larger groups per expert: FP8's share grows);
        # "sources": [...] keeps the variants of those inputs only (e.g. ["tokens, device counts"] with "profile")
        rows = run_experts(argparse.Namespace(**dict(vars(args), tokens=job.get("tokens", args.tokens))), raw,
                           job.get("sources"))
        return _with_fp8_kernel(rows)
    rows = run_model(args, raw, job["mode"], job["backend"], job["layers"], job.get("cache", "none"),
                     job.get("recompute", args.recompute), job.get("mbs", args.micro_batch_size), job.get("accum", 1),
                     job.get("fusions", "auto"), job.get("doc_len", 0), job.get("permutation", "experts"),
                     job.get("offload", False), job.get("token_counts", "host"), job.get("cuda_graphs"),
                     job.get("manual_gc", False), job.get("memory_trace", False))
    for row in rows:
        row["memory_cap_gib"] = job.get("memory_cap_gib")
    return _with_fp8_kernel(rows)


def _with_fp8_kernel(rows):
    """Rows labelled with the FP8 GEMM kernel and quantizers that really ran: "triton" only if the Triton kernels
    launched (where Triton cannot run them, torch's kernel or the CPU emulation, and the compiled quantizers, stand
    in)."""
    from megatron_esft.experts import fp8_triton_gemm, fp8_triton_quantize

    for row in rows:
        row["fp8_kernel"] = "triton" if fp8_triton_gemm.launches else "torch"
        row["fp8_quantizer"] = "triton" if fp8_triton_quantize.launches else "inductor"
    return rows


def _last_result(stdout: str):
    """The rows of the last "RESULT [...]" line a job printed, or None."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="check,gemm,experts,model",
                   help="comma list of job kinds: check, gemm, experts, model")
    p.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test of the script itself)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--tokens", type=int, default=8192, help="tokens for the experts-layer check/benchmark")
    p.add_argument("--layers", type=int, default=27, help="layers of the ESFT full-model runs")
    p.add_argument("--fft-layers", type=int, default=4, help="layers of the ESFT-vs-FFT comparison runs")
    p.add_argument("--recompute", default="none", help="none | selective[:MODULE,...] (Megatron's recompute_modules) | "
                                                    "full (every layer) | block:N (first N)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--profile", action="store_true", help="print torch.profiler kernel tables to the jobs' stderr")
    p.add_argument("--plan", default=None, help="JSON list of jobs (overrides the default plan)")
    p.add_argument("--part", default="1/1", help="K/N: run the K-th of the default plan's 4 parts (N = 4) or of N "
                                                 "equal slices of --plan, to fit a time limit per command (e.g. the "
                                                 "device's 10 minutes)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job, print JSON
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join("runs", "bench")),
                   help="directory for results.jsonl and jobs.log (default: $OUT on the device machine, else "
                        "runs/bench)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per job")
    p.add_argument("--report", default=None, metavar="RESULTS_JSONL",
                   help="print the tables of an earlier run's results.jsonl (no job runs; e.g. one cut off by a time "
                        "limit)")
    args = p.parse_args(argv)
    if args.report is not None:
        with open(args.report) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        print_tables(rows, f"from {args.report}")
        return
    if args.job is not None:
        rows = run_job(args, json.loads(args.job))
        print("RESULT " + json.dumps(rows), flush=True)
        return
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    part, parts = (int(x) for x in args.part.split("/"))
    if not 1 <= part <= parts:
        p.error(f"--part {args.part}: K must be in 1..N")
    if args.plan:
        try:
            plan = json.loads(args.plan)
        except json.JSONDecodeError as exc:
            p.error(f"--plan: not JSON: {exc}")
        if not isinstance(plan, list):
            p.error("--plan: a JSON list of jobs")
        problems = [problem for problem in map(job_problem, plan) if problem]
        if problems:
            p.error(f"--plan: {problems[0]}")
        size = -(-len(plan) // parts)
        plan = plan[(part - 1) * size: part * size]
    else:
        groups = default_plan(args.layers, args.fft_layers)
        if parts not in (1, len(groups)):
            p.error(f"--part {args.part}: the default plan comes in {len(groups)} parts (or 1)")
        plan = [job for group in (groups if parts == 1 else groups[part - 1:part]) for job in group]
    kinds = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    results, path = [], os.path.join(args.out, "results.jsonl")
    common = ["--seq", str(args.seq), "--micro-batch-size", str(args.micro_batch_size), "--tokens", str(args.tokens),
              "--recompute", args.recompute, "--warmup", str(args.warmup), "--iters", str(args.iters)]
    common += ["--tiny"] if args.tiny else []
    common += ["--profile"] if args.profile else []
    for job in [j for j in plan if j["job"] in kinds]:
        profile = ["--profile"] if job.get("profile") and not args.profile else []  # a job may ask for it alone
        cmd = [sys.executable, os.path.abspath(__file__), *common, *profile, "--job", json.dumps(job)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            with open(os.path.join(args.out, "jobs.log"), "a") as log:
                log.write(f"=== {json.dumps(job)} rc={proc.returncode}\n{proc.stdout[-4000:]}\n"
                          + "\n".join(l for l in proc.stderr.splitlines() if "Warning" not in l)[-40000:] + "\n")
            rows = _last_result(proc.stdout)
            if rows is None:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                rows = [{"job": job, "error": ("OOM: " if "out of memory" in proc.stderr.lower() else "") + tail[-400:]}]
        except subprocess.TimeoutExpired as exc:
            # a profiled job prints its measurements before its diagnostics: keep them if they came
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rows = _last_result(out)
            measured = rows is not None
            rows = rows if measured else [{"job": job}]
            rows[-1]["error"] = f"timeout after {args.timeout}s" + (" (after its measurements)" if measured else "")
        for r in rows:
            r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.extend(rows)
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(json.dumps(rows), flush=True)
    print_tables(results, device)


if __name__ == "__main__":
    main()
