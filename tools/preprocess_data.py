"""Tokenize chat JSONL once into Megatron indexed datasets for training and routing-statistics collection.

    python tools/preprocess_data.py --input train.jsonl [--input more.jsonl] --tokenizer CKPT_DIR \
        --output-prefix data/intent [--template esft|chat_template] [--seq-length N --truncate warn|error]

Writes data/intent_tokens.{bin,idx}, data/intent_target_mask.{bin,idx} and data/intent_meta.json (see
megatron_esft/data/documents.py); pass `data/intent` as --train-data / --data afterwards. Documents are stored
whole: --seq-length only checks lengths here (count them, or fail with --truncate error); training truncates.
"""

import _bootstrap  # noqa: F401

import sys
import time

from megatron_esft.data.conversation import TEMPLATES, read_conversations
from megatron_esft.data.documents import write_indexed_documents
from megatron_esft.data.sft_dataset import TRUNCATE_MODES
from megatron_esft.data.tokenizer import load_tokenizer
from megatron_esft.errors import ArgumentParser, UserError, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, help="chat JSONL file (repeat for several)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="checkpoint/tokenizer directory or sentencepiece .model")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--template", choices=TEMPLATES, default="esft")
    p.add_argument("--seq-length", type=int, default=None, help="report (or reject) samples longer than this")
    p.add_argument("--truncate", choices=TRUNCATE_MODES, default="warn")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seq_length is not None and args.seq_length < 2:
        raise UserError(f"--seq-length {args.seq_length}: must be at least 2")
    start = time.perf_counter()
    for path in args.input:  # validate every line first: fail fast, before loading the tokenizer and Megatron-Core
        for _ in read_conversations(path):
            pass
    tokenizer = load_tokenizer(args.tokenizer)
    meta = write_indexed_documents(args.input, tokenizer, args.output_prefix, template=args.template,
                                   max_length=args.seq_length, truncate=args.truncate)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.output_prefix}_{{tokens,target_mask}}.{{bin,idx}} and {args.output_prefix}_meta.json: "
          f"{meta['num_documents']} samples, {meta['num_tokens']} tokens ({meta['num_target_tokens']} trained), "
          f"{elapsed:.2f} s, {meta['num_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s")
    if meta["num_longer_than_max_length"]:
        print(f"warning: {meta['num_longer_than_max_length']} samples are longer than --seq-length {args.seq_length} "
              "and will be truncated when training", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
