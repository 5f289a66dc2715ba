"""Peak memory and time of HF <-> Megatron-Core conversion, relative to the checkpoint size.

Builds a random bf16 HF checkpoint with DeepSeek-V2 (MLA) shapes, then converts it both ways in child processes,
sampling the child's anonymous (RssAnon: private heap) and total resident memory every 20 ms. Memory-mapped file pages
(RssFile) are page cache that the kernel can drop, so RssAnon is what has to fit in RAM.

    python bench/bench_convert.py [--hidden 1024 --layers 6 --experts 64 --moe-ffn 704 --vocab 32000 --shard-gb 0.5]
                                  [--fp8-block 128]

--fp8-block N writes the checkpoint the way DeepSeek released V3/R1 (decoder Linear weights e4m3 with a scale per
N x N block, models/tiny.py): HF -> Megatron then dequantizes into file-backed scratch beside the output (the
table's last column: its peak size, mapped and on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _scratch_bytes() -> int:
    from megatron_esft.checkpoint.convert import FP8_SCRATCH_PREFIX

    """Bytes of this process's FP8 dequantization scratch (checkpoint/safetensors_io.py's ScratchTensors): its files
    are unlinked once mapped, so they are counted in /proc/self/maps."""
    total = 0
    with open("/proc/self/maps") as fh:
        for line in fh:
            if "/" + FP8_SCRATCH_PREFIX in line:
                start, end = line.split()[0].split("-")
                total += int(end, 16) - int(start, 16)
    return total


def child(direction: str, src: str, dst: str, shard_gb: str) -> None:
    peak = {"anon": 0, "rss": 0, "scratch": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            peak["rss"] = max(peak["rss"], _status_kb("VmRSS"))
            peak["scratch"] = max(peak["scratch"], _scratch_bytes())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    from megatron_esft.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_esft.parallel import ParallelConfig

    if direction == "hf->mcore":
        hf_to_mcore(src, dst, ParallelConfig())
    else:
        mcore_to_hf(src, dst, max_shard_bytes=int(float(shard_gb) * 1024**3))
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    print(json.dumps({"anon_gb": peak["anon"] / 1024**2, "rss_gb": peak["rss"] / 1024**2,
                      "scratch_gb": peak["scratch"] / 1024**3, "seconds": elapsed}))


def make_checkpoint(out: str, args) -> tuple[int, int]:
    """Writes the random checkpoint; returns its bytes and parameter count."""
    import torch
    import transformers

    from megatron_esft.checkpoint.fp8_blocks import BlockFp8Format
    from megatron_esft.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from megatron_esft.models.tiny import TinySpec, deepseek_v3_fp8_config, deepseek_v3_fp8_tensors, hf_config_dict

    spec = TinySpec(arch="deepseek-v2", layers=args.layers, hidden=args.hidden, experts=args.experts, topk=6,
                    moe_ffn=args.moe_ffn, vocab=args.vocab, heads=16, intermediate=4 * args.hidden,
                    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, dtype="bfloat16")
    config = hf_config_dict(spec)
    with torch.device("meta"):
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**config))
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # transformers 5 fuses experts in memory; the files use per-expert names
    shapes = {}
    for name, shape in names.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(shape[0]):
                shapes[f"{prefix}{e}.gate_proj.weight"] = (shape[1] // 2, shape[2])
                shapes[f"{prefix}{e}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(shape[0]):
                shapes[f"{prefix}{e}.down_proj.weight"] = shape[1:]
        else:
            shapes[name] = shape
    os.makedirs(out)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=512 * 1024**2)
    total = params = 0
    generator = torch.Generator().manual_seed(0)
    fmt = BlockFp8Format(block=(args.fp8_block, args.fp8_block)) if args.fp8_block else None
    for name in sorted(shapes):
        tensor = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
        params += tensor.numel()
        for stored_name, stored in deepseek_v3_fp8_tensors(name, tensor, fmt) if fmt is not None else [(name, tensor)]:
            writer.add(stored_name, stored)
            total += stored.numel() * stored.element_size()
    writer.close()
    if fmt is not None:
        config["quantization_config"] = deepseek_v3_fp8_config(args.fp8_block)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh)
    return total, params


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--moe-ffn", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-gb", type=float, default=0.5, help="export shard size (the export holds one shard)")
    parser.add_argument("--fp8-block", type=int, default=0, metavar="N",
                        help="write the source in DeepSeek's block-wise FP8 (N x N blocks), as V3/R1 were released")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        hf, mcore, back = (os.path.join(tmp, n) for n in ("hf", "mcore", "back"))
        size, params = make_checkpoint(hf, args)
        rows = []
        for direction, src, dst in (("hf->mcore", hf, mcore), ("mcore->hf", mcore, back)):
            proc = subprocess.run([sys.executable, __file__, "--child", direction, src, dst, str(args.shard_gb)], capture_output=True,
                                  text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            rows.append((direction, json.loads(proc.stdout.strip().splitlines()[-1])))
    gb = size / 1024**3
    form = f"FP8 ({args.fp8_block}x{args.fp8_block} blocks)" if args.fp8_block else "bf16"
    print(f"checkpoint: {gb:.2f} GiB {form} ({params / 1e6:.0f}M params; hidden {args.hidden}, {args.layers} "
          f"layers, {args.experts} experts x ffn {args.moe_ffn}); export shards of {args.shard_gb} GiB")
    print("| direction | time (s) | peak RssAnon (GiB) | anon / checkpoint | peak VmRSS (GiB) | peak scratch (GiB) |")
    print("|---|---|---|---|---|---|")
    for direction, r in rows:
        print(f"| {direction} | {r['seconds']:.1f} | {r['anon_gb']:.2f} | {r['anon_gb'] / gb:.2f}x | {r['rss_gb']:.2f} "
              f"| {r['scratch_gb']:.2f} |")


if __name__ == "__main__":
    main()
