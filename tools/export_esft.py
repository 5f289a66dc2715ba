"""Export the ESFT adapter of a training checkpoint: expert_cfg.json + the trained experts only, in HF naming.

The output is what the official ESFT `esft.py` (`load_esft_model` / `add_adapter`) loads onto the base model. With
--merge-into-hf BASE_HF_DIR --merged-out DIR it also writes base + adapter as a full HF checkpoint.
"""

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--load", required=True, help="checkpoint directory written by pretrain_esft.py")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--merge-into-hf", default=None, help="base HF checkpoint to merge the adapter into")
    parser.add_argument("--merged-out", default=None, help="where to write the merged HF checkpoint")
    args = parser.parse_args()
    from megatron_esft.checkpoint.adapter import export_adapter, merge_adapter
    from megatron_esft.errors import UserError

    if bool(args.merge_into_hf) != bool(args.merged_out):
        raise UserError("--merge-into-hf and --merged-out go together")
    info = export_adapter(args.load, args.out, args.iteration)
    print(f"wrote ESFT adapter (iteration {info['iteration']}: {info['tensors']} tensors, "
          f"{info['parameters']:,} parameters) to {args.out}")
    if args.merge_into_hf:
        n = merge_adapter(args.merge_into_hf, args.out, args.merged_out)
        print(f"wrote base + adapter ({n} tensors replaced) to {args.merged_out}")


if __name__ == "__main__":
    run_cli(main)
