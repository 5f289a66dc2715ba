"""Expert-Specialized Fine-Tuning (or full fine-tuning) of a DeepSeek MoE model on Megatron-Core.

    torchrun --nproc_per_node N pretrain_esft.py --load BASE --save OUT --train-data task.jsonl \
        --expert-config expert_config.json --train-iters 500 --micro-batch-size 1 --global-batch-size 32 \
        --seq-length 4096 --lr 1e-5 --weight-decay 0.1 [--expert-model-parallel-size 2 ...]

See megatron_esft/training/loop.py (the loop) and DESIGN.md (the command-line contract). `--load` of a base
checkpoint starts at iteration 0; `--load` of a checkpoint written by this script resumes exactly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_esft.errors import run_cli  # noqa: E402


def main():
    from megatron_esft.training.loop import pretrain

    return pretrain()


if __name__ == "__main__":
    run_cli(main)
