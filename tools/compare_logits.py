"""Compare logits of transformers' DeepSeek implementation (or the DeepSeekMoE float64 reference) with our
Megatron-Core model on the same random tokens, in fp32."""

import json

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--load", required=True)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from megatron_esft.models.parity import compare_logits

    result = compare_logits(args.hf, args.load, args.seq_length, args.batch, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['arch']}: max_abs_diff {result['max_abs_diff']:.3e}  rel_l2 {result['rel_l2']:.3e}  "
              f"({result['tokens']} tokens, reference: {result['reference']})")


if __name__ == "__main__":
    run_cli(main)
