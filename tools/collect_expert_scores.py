"""Forward-only scoring pass: routing statistics of a task's data on a converted checkpoint -> DIR/scores.json.

    [torchrun --nproc_per_node N] python tools/collect_expert_scores.py --load DIR --data FILE.jsonl --out DIR
        [--tokenizer DIR] [--max-tokens 131072] [--seq-length 4096] [--expert-model-parallel-size N ...]

scores.json has the official summary.json shape (token_scores, gate_scores per HF layer key and global expert id, at
full precision) plus counts, gate sums, token counts and the model/data it came from; feed it to
tools/select_experts.py --scores. Also writes DIR/scores_token.png (heatmap, Token p=0.2 selection outlined).
"""

import os

import _bootstrap  # noqa: F401

from megatron_esft.errors import UserError, run_cli
from megatron_esft.parallel import add_distributed_timeout_argument, add_uneven_pipeline_arguments
from megatron_esft.atomic import require_directory_or_absent
from megatron_esft.routing.cli import ArgumentParser
from megatron_esft.routing.scores import GATE_KINDS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="converted Megatron-Core checkpoint directory")
    parser.add_argument("--data", required=True, nargs="+", help="task data: messages JSONL (or an indexed prefix)")
    parser.add_argument("--out", required=True, help="output directory for scores.json")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's hf_assets)")
    parser.add_argument("--max-tokens", type=int, default=131072, help="tokens to score (paper: 131072 = 32 x 4096)")
    parser.add_argument("--seq-length", type=int, default=4096, help="packed sample length")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234, help="shuffle of the data before sampling")
    parser.add_argument("--template", default="esft", help="esft (the official prompt layout) or chat")
    parser.add_argument("--gate", default="raw", help="raw (softmax/sigmoid score, the paper's) or normalized "
                        "(top-k weights renormalised to sum 1 per token)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    add_uneven_pipeline_arguments(parser)
    add_distributed_timeout_argument(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    parser.add_argument("--tensorboard-dir", help="also log the score heatmaps to TensorBoard")
    parser.add_argument("--no-plot", action="store_true", help="do not write scores_token.png")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_tokens", "seq_length", "micro_batch_size", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gate not in GATE_KINDS:
        raise UserError(f"--gate: unknown gate kind {args.gate!r} (choose from {', '.join(GATE_KINDS)})")
    if not os.path.isdir(args.load):
        raise UserError(f"--load {args.load}: directory does not exist")
    require_directory_or_absent("--out", args.out, " (scores.json is written into --out)")
    from megatron_esft.data.blend import parse_weighted_paths
    from megatron_esft.data.documents import check_data_path

    if parse_weighted_paths(args.data, "--data")[1] is not None:
        raise UserError("--data takes paths only: experts are scored on the task data itself (a weighted blend is "
                        "for pretrain_esft.py --train-data)")
    for path in args.data:
        check_data_path(path)
    from megatron_esft.routing.collect import CollectArgs, collect_expert_scores

    collect_expert_scores(CollectArgs(
        load=args.load, data=args.data, out=args.out, tokenizer=args.tokenizer, max_tokens=args.max_tokens,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, seed=args.seed, template=args.template,
        gate=args.gate, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers, dtype=args.dtype,
        tensorboard_dir=args.tensorboard_dir, plot=not args.no_plot, progress=not args.no_progress,
    ))
    return 0


if __name__ == "__main__":
    run_cli(main)
