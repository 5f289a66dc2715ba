"""Evaluate ESFT task outputs with the official ESFT metric semantics.

Scoring mode (works now; any system's outputs, ours or the official released completions):
    python tools/evaluate.py --task intent --completions FILE [FILE ...] [--eval-data FILE] [--output FILE] [--json]

Generation mode (greedy batched generation with our Megatron-Core model, then scoring, plus the loss/perplexity of
the reference answers in the official training layout):
    python tools/evaluate.py --task intent --load DIR --tokenizer DIR --eval-data FILE [--max-new-tokens 128]
        [--eval-batch-size 8] [--padding-side right] [--completions-out FILE] [--output FILE] [--json]
One process (no torchrun), the whole model on one device (GPU if available), no KV cache. The model comes from
`megatron_esft.eval.inference.load_forward` and the loop from `megatron_esft.eval.generate.generate`, which takes any
`logits = forward(tokens, position_ids, attention_mask)` callable.

Prints a small table (or, with --json, one JSON object): samples, correct, score (= mean x 100, the paper's metric),
intent accuracy, and counts of why samples were wrong. --output writes per-sample records (our completions format plus
"score" and "verdict").
"""

import _bootstrap  # noqa: F401

import json

from megatron_esft.errors import ArgumentParser, UserError, run_cli
from megatron_esft.eval.completions import (
    Completion,
    attach_eval_data,
    load_completions,
    load_eval_data,
    write_jsonl_atomic,
)
from megatron_esft.eval.scoring import TASKS, score_completions


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--completions", nargs="+", metavar="FILE",
                        help="completions JSONL (ours or the official results format); several files are merged")
    parser.add_argument("--eval-data", metavar="FILE", help="official eval JSONL {idx, prompt, raw_answers, answers}")
    parser.add_argument("--output", metavar="FILE", help="write per-sample scores here (JSONL)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    generation = parser.add_argument_group("generation mode")
    generation.add_argument("--load", metavar="DIR", help="checkpoint to generate with (base or trained)")
    generation.add_argument("--tokenizer", metavar="DIR")
    generation.add_argument("--max-new-tokens", type=int, default=128, help="official default 128 (eval.sh: 512)")
    generation.add_argument("--eval-batch-size", type=int, default=8)
    generation.add_argument("--padding-side", choices=("right", "left"), default="right")
    generation.add_argument("--completions-out", metavar="FILE", help="write the generated completions here")
    args = parser.parse_args(argv)
    if (args.completions is None) == (args.load is None):
        raise UserError("give exactly one of --completions FILE (scoring mode) or --load DIR (generation mode)")
    if args.load is not None:
        if args.tokenizer is None or args.eval_data is None:
            raise UserError("generation mode needs --load, --tokenizer and --eval-data")
        if args.max_new_tokens < 1 or args.eval_batch_size < 1:
            raise UserError("--max-new-tokens and --eval-batch-size must be >= 1")
    return args


def generate_completions(args) -> tuple[list[Completion], dict]:
    """Generation mode: greedy completions for every eval prompt, and the reference-answer loss/perplexity."""
    from megatron_esft.eval.generate import generate
    from megatron_esft.eval.inference import load_forward, load_tokenizer
    from megatron_esft.eval.loss import reference_answer_loss

    samples = load_eval_data(args.eval_data)
    tokenizer = load_tokenizer(args.tokenizer)
    forward = load_forward(args.load)
    prompts = [s.prompt for s in samples]
    texts = generate(forward, tokenizer, prompts, args.max_new_tokens, args.eval_batch_size, args.padding_side)
    loss = reference_answer_loss(forward, tokenizer, prompts, [s.raw_answers[0] for s in samples],
                                 args.eval_batch_size)
    completions = [Completion(prediction=text, where=f"generated:{s.idx}", idx=s.idx, prompt=s.prompt,
                              raw_answers=s.raw_answers) for s, text in zip(samples, texts)]
    return completions, loss


def format_table(summary: dict) -> str:
    rows = [("task", summary["task"]), ("samples", summary["samples"]), ("correct", summary["correct"]),
            ("score (x100)", f"{summary['score']:.2f}"), ("intent accuracy", f"{summary['intent_accuracy']:.2f}")]
    rows += [(f"  {verdict}", count) for verdict, count in summary["verdicts"].items()]
    for key in ("reference_loss", "reference_ppl", "reference_tokens"):
        if key in summary:
            rows.append((key.replace("_", " "), summary[key]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None):
    args = parse_args(argv)
    loss = {}
    if args.completions is not None:
        completions = load_completions(args.completions)
        if args.eval_data is not None:
            completions = attach_eval_data(completions, load_eval_data(args.eval_data))
    else:
        completions, loss = generate_completions(args)
        if args.completions_out:
            write_jsonl_atomic(args.completions_out, [
                {"idx": c.idx, "prompt": c.prompt, "prediction": c.prediction, "raw_answers": c.raw_answers}
                for c in completions])
    summary, records = score_completions(completions, args.task)
    summary.update({f"reference_{k}": v for k, v in loss.items()})
    if args.output:
        write_jsonl_atomic(args.output, records)
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
