"""ESFT vs full fine-tuning (FFT) on the same code path: time per iteration and peak memory, in one run.

A ~100M-parameter DeepSeek-V2-style MoE (random weights; 64 routed experts, top-6, 2 shared experts) is trained
for a few iterations with the real training step of pretrain_esft.py (Megatron DDP + distributed optimizer, AdamW,
clipping), once with `--finetune-mode esft` (about 10% of the routed experts of every MoE layer selected at
random, everything else frozen) and once with `--finetune-mode full`. Each mode runs in its own process, so memory is
measured cleanly:

* GPU: `torch.cuda.max_memory_allocated()` over the timed iterations;
* CPU: peak RSS during the training iterations (the high-water mark is reset after setup) minus the RSS just
  before the model is built: weights + gradients + optimizer state + activations.

    python bench/esft_vs_fft.py [--seq-length 512] [--iters 3] [--experts-impl grouped] [--selected-fraction 0.1]

Prints a table with both modes and the ESFT/FFT ratios (targets: time <= 0.65x, memory <= 0.4x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(arch="deepseek-v2", layers=7, hidden=512, experts=64, topk=6, moe_ffn=128, vocab=16000, heads=8,
             intermediate=1408)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Release freed heap to the OS and reset the RSS high-water mark (Linux `clear_refs` 5), so the peak covers
    the training iterations only, not the transient copies made while building and partitioning the model."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def tensor_accounting(model, ddp, optimizer, batch) -> dict:
    """Bytes held by the training state, from the objects themselves (allocator-independent): weights, DDP grad
    buffers, optimizer state, and the activations one micro-batch saves for backward (unique storages, weights
    excluded)."""
    import torch

    from megatron_esft.checkpoint.training_state import live_optimizers
    from megatron_esft.data import build_attention_mask

    params = list(model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    grads = sum(b.grad_data.nbytes for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers))
    state = _unique_bytes(t for o in live_optimizers(optimizer) for st in o.optimizer.state.values()
                          for t in st.values() if torch.is_tensor(t) and t.numel() > 1)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch["tokens"], batch["position_ids"], build_attention_mask(batch), labels=batch["labels"])
    del loss
    return {"weights": _unique_bytes(params), "grads": grads, "optimizer": state, "activations": _unique_bytes(saved)}


def run_mode(opts) -> dict:
    import torch

    from megatron_esft.esft import freeze
    from megatron_esft.esft.expert_config import ExpertConfig
    from megatron_esft.esft.hang_guard import install_hang_guard
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig
    from megatron_esft.training import setup
    from megatron_esft.training.arguments import build_parser, validate
    from megatron_esft.training.loop import _run_micro_batches

    cfg = parse_hf_config(hf_config_dict(TinySpec(**MODEL)), source="bench")
    argv = ["--load", "-", "--train-data", "-", "--train-iters", str(opts.iters + 1), "--micro-batch-size", "1",
            "--global-batch-size", str(opts.micro_batches), "--seq-length", str(opts.seq_length), "--lr", "1e-5",
            "--weight-decay", "0.1", "--experts-impl", opts.experts_impl, "--finetune-mode", opts.mode]
    if torch.cuda.is_available():
        argv.append("--bf16")
    args = validate(build_parser().parse_args(argv), 1)
    parallel = ParallelConfig()
    setup.initialize_parallel(parallel, seed=1234)
    rng = random.Random(opts.seed)
    per_layer = max(1, round(opts.selected_fraction * cfg.n_routed_experts))
    ecfg = ExpertConfig({str(k): sorted(rng.sample(range(cfg.n_routed_experts), per_layer)) for k in cfg.moe_layers})
    rss0 = _current_rss()
    model = setup.build_trainable_model(args, cfg, parallel)
    freeze.apply_finetune_mode(model, opts.mode, ecfg if opts.mode == "esft" else None)
    first = freeze.first_trainable_layer_number(ecfg if opts.mode == "esft" else None, opts.mode,
                                                [str(k) for k in cfg.moe_layers])
    install_hang_guard(model, first)
    report = freeze.count_trainable(model, cfg.num_layers)
    ddp = setup.wrap_ddp(model)
    optimizer = setup.build_optimizer(args, ddp)
    setup.configure_schedule_hooks(ddp, optimizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(opts.seed)
    s = opts.seq_length

    def batch():
        tokens = torch.randint(3, cfg.vocab_size, (1, s), generator=gen)
        return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(1, s),
                "position_ids": torch.arange(s).unsqueeze(0), "document_ids": torch.zeros(1, s, dtype=torch.long)}

    times = []
    if device == "cpu":
        _reset_peak_rss()
    for it in range(opts.iters + 1):
        batches = [batch() for _ in range(args.num_micro_batches)]
        if it == 1 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        _run_micro_batches(ddp, batches, args, None, False, 1.0 / s)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if it > 0:  # the first iteration allocates buffers and warms up kernels
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM") - rss0
    accounting = tensor_accounting(model, ddp, optimizer, batch())
    return {"mode": opts.mode, "ms_per_iter": 1000.0 * min(times), "ms_mean": 1000.0 * sum(times) / len(times),
            "peak_bytes": peak, "accounted": accounting, "trainable": report.total, "total": report.total_params, "device": device,
            "selected_per_layer": per_layer}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches (of 1 sequence) per iteration")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--experts-impl", choices=["grouped", "sequential"], default="grouped")
    parser.add_argument("--selected-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["esft", "full"], default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.mode:
        print("RESULT " + json.dumps(run_mode(opts)), flush=True)
        return
    results = {}
    for mode in ("esft", "full"):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"error: {mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(lines[-1][7:])
    e, f = results["esft"], results["full"]
    print(f"model: {MODEL}, {f['total'] / 1e6:.1f}M parameters; seq {opts.seq_length} x {opts.micro_batches} "
          f"micro-batches per iteration; experts impl {opts.experts_impl}; device {e['device']}; "
          f"ESFT selects {e['selected_per_layer']} of {MODEL['experts']} experts per MoE layer")
    peak_name = "peak GPU MiB" if e["device"] == "cuda" else "peak RSS MiB"
    mib = lambda r, k: r["accounted"][k] / 2**20  # noqa: E731
    total = lambda r: sum(r["accounted"].values())  # noqa: E731
    print(f"| mode | trainable params | ms/iter (best) | ms/iter (mean) | {peak_name} | weights MiB | grads MiB | "
          "optimizer MiB | activations MiB | accounted MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (e, f):
        print(f"| {r['mode']} | {r['trainable']:,} | {r['ms_per_iter']:.0f} | {r['ms_mean']:.0f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {mib(r, 'weights'):.0f} | {mib(r, 'grads'):.0f} | "
              f"{mib(r, 'optimizer'):.0f} | {mib(r, 'activations'):.0f} | {total(r) / 2**20:.0f} |")
    print(f"| ESFT / FFT | {e['trainable'] / f['trainable']:.3f}x | {e['ms_per_iter'] / f['ms_per_iter']:.2f}x | "
          f"{e['ms_mean'] / f['ms_mean']:.2f}x | {e['peak_bytes'] / f['peak_bytes']:.2f}x | | | | "
          f"{e['accounted']['activations'] / max(f['accounted']['activations'], 1):.2f}x | {total(e) / total(f):.2f}x |")


if __name__ == "__main__":
    main()
