"""Write a tiny random DeepSeek checkpoint in Hugging Face format (config, safetensors, tokenizer)."""

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli
from megatron_esft.models.tiny import ARCHES, TinySpec, make_tiny_deepseek


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=ARCHES, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--moe-ffn", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--q-lora-rank", type=int, default=None, help="MLA query LoRA rank (default: none for v2, 24 for v3)"
    )
    parser.add_argument("--topk-method", choices=["greedy", "group_limited_greedy"], default="greedy")
    parser.add_argument("--n-group", type=int, default=None)
    parser.add_argument("--topk-group", type=int, default=None)
    parser.add_argument("--yarn", action="store_true", help="give the config YaRN rope scaling")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--fp8-block", type=int, default=None, metavar="N",
                        help="write DeepSeek-V3's released FP8 layout: the decoder layers' Linear weights in e4m3 with "
                             "a weight_scale_inv per N x N block, the rest in bf16")
    args = parser.parse_args()
    spec = TinySpec(arch=args.arch, layers=args.layers, hidden=args.hidden, experts=args.experts, topk=args.topk,
                    moe_ffn=args.moe_ffn, vocab=args.vocab, heads=args.heads, q_lora_rank=args.q_lora_rank,
                    topk_method=args.topk_method, n_group=args.n_group, topk_group=args.topk_group, yarn=args.yarn,
                    seed=args.seed, dtype=args.dtype, fp8_block=args.fp8_block)
    make_tiny_deepseek(spec, args.out)
    print(f"wrote tiny {args.arch} checkpoint to {args.out}")


if __name__ == "__main__":
    run_cli(main)
