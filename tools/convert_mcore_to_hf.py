"""Convert a megatron_esft checkpoint (base or trained) into a full Hugging Face checkpoint.

Tensor names and dtypes equal the source HF checkpoint's; config and tokenizer are carried over.
"""

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--load", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0,
                        help="safetensors shard size; the export holds one shard (plus one layer) in memory")
    args = parser.parse_args()
    from megatron_esft.checkpoint.convert import mcore_to_hf

    mcore_to_hf(args.load, args.out, args.iteration, int(args.max_shard_size_gb * 1024**3))
    print(f"wrote Hugging Face checkpoint to {args.out}")


if __name__ == "__main__":
    run_cli(main)
