"""Convert a Hugging Face DeepSeek checkpoint into a Megatron-Core dist checkpoint (iteration 0, no optimizer).

The result loads at any TP/EP/PP. Run it as one process (it writes the full tensors), or under torchrun with
--tp/--ep/--pp to write from that layout. DeepSeek's block-wise FP8 release (V3/R1) is dequantized on the way in
(checkpoint/fp8_blocks.py); tools/convert_mcore_to_hf.py writes it back in FP8.
"""

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="stored parameter dtype (default: the HF config's torch_dtype)")
    parser.add_argument("--scratch-dir", default=None,
                        help="FP8 checkpoints: where the weights are dequantized during the conversion (default: "
                             "beside --out; node-local disk is best); each rank needs its shard's size in --dtype")
    args = parser.parse_args()
    from megatron_esft.checkpoint.convert import hf_to_mcore
    from megatron_esft.parallel import ParallelConfig, print_rank0

    hf_to_mcore(args.hf, args.out, ParallelConfig(args.tp, args.pp, args.ep), dtype=args.dtype,
                scratch_dir=args.scratch_dir)
    print_rank0(f"saved Megatron-Core checkpoint (iteration 0) to {args.out}")


if __name__ == "__main__":
    run_cli(main)
