"""Throughput of the SFT data pipeline on the official ESFT train sets: preprocessing and the data loader.

    .venv/bin/python bench/bench_data.py [--tokenizer DIR] [--data-dir DIR] [--seq-length 4096]
        [--micro-batch-size 1] [--batches 200] [--model-seq-length 512]

Prints one table per part:
* preprocessing: JSONL -> tokens in memory (validation + ESFT template + batched fast tokenizer), and the full
  tools/preprocess_data.py path (also writes Megatron .bin/.idx); the one-off Megatron-Core import is listed apart;
* loader: micro-batches from the JSONL-backed and the indexed dataset (packing, sample tensors), plus building the
  [b, 1, s, s] attention mask on the CPU;
* step comparison: the loader's time per micro-batch next to one forward+backward of the tiny DeepSeek-V2 model at
  `--model-seq-length` on this CPU (the smallest model the project trains; any real model step is far longer).
Without --tokenizer the tiny offline tokenizer is built (vocab 512: about 2x more tokens per character than
DeepSeek's 100K vocabulary, so tokens/s here are per tiny-tokenizer token).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _table import print_table  # noqa: E402 (bench/ is on sys.path when run as a script)
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "fixtures" / "esft_official" / "datasets" / "train"


def timed(fn, repeat=1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def table(title, header, rows):
    print(f"\n{title}")
    print_table(header, rows)


def bench_preprocess(tasks, tok, tmp):
    from megatron_esft.data.conversation import read_conversations, tokenize_conversations
    from megatron_esft.data.documents import _indexed_dataset_module, write_indexed_documents

    t_import, _ = timed(_indexed_dataset_module)
    rows, prefixes = [], {}
    for task, path in tasks.items():
        def in_memory():
            convs = list(read_conversations(str(path)))
            return convs, tokenize_conversations(convs, tok)

        t_mem, (convs, docs) = timed(in_memory, repeat=2)
        n_tokens = sum(len(t) for t, _ in docs)
        prefix = os.path.join(tmp, task)
        t_write, _ = timed(lambda: write_indexed_documents([str(path)], tok, prefix), repeat=2)
        prefixes[task] = prefix
        rows.append([task, len(convs), n_tokens, f"{t_mem:.2f}", f"{n_tokens / t_mem:,.0f}", f"{t_write:.2f}",
                     f"{n_tokens / t_write:,.0f}"])
    table("preprocessing (best of 2; Megatron-Core import, once per process: %.2f s)" % t_import,
          ["task", "samples", "tokens", "JSONL->tokens s", "tokens/s", "JSONL->.bin/.idx s", "tokens/s"], rows)
    return prefixes


def bench_loader(tasks, prefixes, tok, args):
    import torch

    from megatron_esft.data import SFTDataLoader, build_attention_mask, build_sft_datasets

    rows, per_batch = [], {}
    for task, path in tasks.items():
        for source, data in (("jsonl", str(path)), ("indexed", prefixes[task])):
            t_build, (train, _) = timed(lambda: build_sft_datasets(
                data, tokenizer=tok, seq_length=args.seq_length, seed=1234, pack=True))
            loader = SFTDataLoader(train, args.micro_batch_size, dp_rank=0, dp_size=1)
            next(loader)  # plans epoch 0
            # best chunk of 20 micro-batches: robust to other processes sharing the CPU
            n, chunk, real, best = args.batches, 20, 0, float("inf")
            for _ in range(max(1, n // chunk)):
                start = time.perf_counter()
                for _ in range(chunk):
                    batch = next(loader)
                best = min(best, (time.perf_counter() - start) / chunk)
                real += int((batch["document_ids"] >= 0).sum())
            t_mask, _ = timed(lambda: build_attention_mask(batch), repeat=5)
            fill = real / (max(1, n // chunk) * args.micro_batch_size * args.seq_length)
            tokens_per_batch = fill * args.micro_batch_size * args.seq_length
            per_batch[(task, source)] = best
            rows.append([task, source, f"{t_build:.2f}", len(train), f"{fill:.1%}", f"{1e3 * best:.2f}",
                         f"{tokens_per_batch / best:,.0f}", f"{1e3 * t_mask:.1f}"])
    table(f"data loader (seq {args.seq_length}, micro-batch {args.micro_batch_size}, {args.batches} micro-batches, "
          f"{torch.get_num_threads()} threads)",
          ["task", "source", "dataset build s", "samples/epoch", "fill", "ms/micro-batch", "real tokens/s",
           "attn mask ms (CPU)"], rows)
    return per_batch


def bench_model_step(tok, args):
    import torch

    from megatron_esft.data import SFTDataLoader, build_attention_mask, build_sft_datasets
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=0)
    model = build_model(parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", vocab=512))))
    train, _ = build_sft_datasets(str(DEFAULT_DATA / "intent.jsonl"), tokenizer=tok, seq_length=args.model_seq_length)
    loader = SFTDataLoader(train, args.micro_batch_size, 0, 1)

    def data():
        batch = next(loader)
        return batch, build_attention_mask(batch)

    def step(batch, mask):
        loss = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        (loss * batch["loss_mask"]).sum().backward()

    step(*data())  # warm-up
    t_data = min(timed(data)[0] for _ in range(10))
    times = []
    for _ in range(5):
        batch, mask = data()
        times.append(timed(lambda: step(batch, mask))[0])
    t_step = min(times)
    table(f"loader vs. one training step (tiny DeepSeek-V2, seq {args.model_seq_length}, micro-batch "
          f"{args.micro_batch_size}, CPU)", ["loader + mask ms", "fwd+bwd ms", "loader share"],
          [[f"{1e3 * t_data:.2f}", f"{1e3 * t_step:.1f}", f"{t_data / (t_data + t_step):.1%}"]])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--model-seq-length", type=int, default=512)
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()

    from megatron_esft.data import build_tiny_tokenizer, load_tokenizer

    tasks = {t: Path(args.data_dir) / f"{t}.jsonl" for t in ("intent", "law")}
    missing = [str(p) for p in tasks.values() if not p.is_file()]
    if missing:
        sys.exit(f"error: missing {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer is None:
            t_tok, _ = timed(lambda: build_tiny_tokenizer(os.path.join(tmp, "tok")), repeat=3)
            print(f"tiny tokenizer build: {t_tok:.3f} s (best of 3)")
            args.tokenizer = os.path.join(tmp, "tok")
        tok = load_tokenizer(args.tokenizer)
        print(f"tokenizer: {tok}")
        prefixes = bench_preprocess(tasks, tok, tmp)
        bench_loader(tasks, prefixes, tok, args)
        if not args.skip_model:
            bench_model_step(tok, args)


if __name__ == "__main__":
    main()
