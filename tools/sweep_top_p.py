"""Sweep ESFT's top-p threshold: for each p, select experts and train; write sweep.md/.csv and sweep.png
(p vs trainable share vs validation loss). Arguments after `--` go to pretrain_esft.py (give it validation data:
--valid-data or --split, and --eval-interval).

    python tools/sweep_top_p.py --scores runs/scores --method gate --top-p 0.05 0.1 0.2 0.3 --load runs/base \
        --out runs/sweep -- --train-data task.jsonl --split 90,10 --eval-interval 50 --train-iters 200 \
        --micro-batch-size 4 --global-batch-size 8 --seq-length 512 --lr 1e-4
"""

import sys

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, UserError, run_cli
from megatron_esft.routing.cli import unit_interval


def main():
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True)
    parser.add_argument("--method", choices=["token", "gate"], required=True)
    parser.add_argument("--top-p", type=unit_interval, nargs="+", required=True)
    parser.add_argument("--load", required=True, help="base checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per training run (torchrun)")
    args = parser.parse_args(argv)
    if not train_args:
        raise UserError("give pretrain_esft.py's arguments after '--' (data, iterations, batch sizes, lr)")
    from megatron_esft.esft.sweep import run_sweep

    run_sweep(args.scores, args.method, sorted(args.top_p), args.load, args.out, train_args, args.nproc)


if __name__ == "__main__":
    run_cli(main)
