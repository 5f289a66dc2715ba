"""Select the experts ESFT trains, from expert scores; writes the official expert-config JSON.

    python tools/select_experts.py (--scores PATH | --official-logs DIR) --method {token,gate} --top-p P --out FILE.json

`--scores` takes our scores.json (tools/collect_expert_scores.py) or an official summary.json, or a directory holding
one. `--official-logs` reads the official routing logs (expert_weights_{layer}.txt) and, like the official pipeline,
selects from scores rounded to 4 decimals (`--round-decimals none` for full precision). Instead of --top-p, `--budget N`
picks the largest p whose routed experts fit N trainable parameters. `--random-control` keeps the number of experts
per layer but draws them at random (the paper's Table 4 control). `--model` (a HF config.json or its directory)
checks that scores and config belong to that model.
"""

import argparse

import _bootstrap  # noqa: F401

from megatron_esft.errors import UserError, run_cli
from megatron_esft.esft.expert_config import ExpertConfig, ModelShape, save_expert_config
from megatron_esft.routing.cli import ArgumentParser, parameter_count, unit_interval
from megatron_esft.routing.scores import METHODS, load_scores, read_official_logs
from megatron_esft.routing.selection import random_control, select_top_p, select_under_budget

DEFAULT_TOP_P = {"token": 0.2, "gate": 0.1}  # the paper's thresholds
OFFICIAL_DECIMALS = 4  # the official summary.json rounding


def decimals(text: str):
    """argparse type: an integer >= 0, or 'none'."""
    if text.lower() == "none":
        return "none"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of decimals or 'none', got {text!r}")
    return int(text)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="scores.json / official summary.json, or a directory holding one")
    source.add_argument("--official-logs", metavar="DIR", help="official routing logs expert_weights_{layer}.txt")
    parser.add_argument("--method", required=True, help="token (ESFT-Token) or gate (ESFT-Gate)")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--top-p", type=unit_interval, help="cumulative score threshold in (0, 1] "
                           "(default: 0.2 for token, 0.1 for gate, as in the paper)")
    threshold.add_argument("--budget", type=parameter_count,
                           help="routed-expert parameter budget (e.g. 1.07e9): choose the largest p that fits")
    parser.add_argument("--params-per-expert", type=parameter_count,
                        help="parameters of one routed expert (default: from --model, 3 x hidden x moe_ffn)")
    parser.add_argument("--random-control", action="store_true",
                        help="same number of experts per layer, drawn at random (paper Table 4)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of --random-control")
    parser.add_argument("--shared-experts", action="store_true", help='set "shared_experts": true (train them)')
    parser.add_argument("--non-expert-modules", action="store_true",
                        help='set "non_expert_modules": true (train attention, norms, router, embeddings)')
    parser.add_argument("--model", help="HF config.json (or its directory) of the model being configured")
    parser.add_argument(
        "--topk", type=int, help="routed experts per token in --official-logs (default: --model's, or 6)"
    )
    parser.add_argument("--num-experts", type=int, help="routed experts per layer in --official-logs "
                        "(default: --model's, or the largest id seen + 1)")
    parser.add_argument("--round-decimals", type=decimals, help="round scores before selecting, as the official "
                        "pipeline does (logs -> summary.json at 4 decimals -> config); default: 4 with "
                        "--official-logs, full precision with --scores; 'none' = full precision")
    parser.add_argument("--out", required=True, help="expert config JSON to write")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.method not in METHODS:
        raise UserError(f"--method: unknown scoring method {args.method!r} (choose from {', '.join(METHODS)})")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    shape = ModelShape.from_hf_config(args.model) if args.model else None

    if args.official_logs:
        topk = args.topk or (shape.topk if shape and shape.topk else 6)
        num_experts = args.num_experts or (shape.num_experts if shape else None)
        scores = read_official_logs(args.official_logs, topk=topk, num_experts=num_experts)
    else:
        if args.topk or args.num_experts:
            raise UserError("--topk/--num-experts only apply to --official-logs")
        scores = load_scores(args.scores)
    if shape is not None:
        scores.check_model(shape)
    rounding = args.round_decimals if args.round_decimals is not None else (
        OFFICIAL_DECIMALS if args.official_logs else "none")
    if rounding != "none":
        scores = scores.rounded(rounding)

    if args.budget is not None:
        per_expert = args.params_per_expert or (shape.params_per_expert if shape else None)
        if not per_expert:
            raise UserError("--budget needs --params-per-expert (or --model to derive it)")
        chosen = select_under_budget(scores, args.method, args.budget, per_expert)
        top_p, experts = chosen.top_p, chosen.experts
    else:
        top_p = args.top_p if args.top_p is not None else DEFAULT_TOP_P[args.method]
        experts = select_top_p(scores, args.method, top_p)
    if args.random_control:
        experts = random_control(experts, scores.num_experts, args.seed)

    config = ExpertConfig(experts, shared_experts=args.shared_experts, non_expert_modules=args.non_expert_modules)
    save_expert_config(config, args.out, shape)

    n, layers = config.num_selected(), len(experts)
    per_expert = args.params_per_expert or (shape.params_per_expert if shape else None)
    params = f", {n * per_expert:,} routed-expert parameters" if per_expert else ""
    kind = "random control of " if args.random_control else ""
    print(f"{kind}ESFT-{args.method.capitalize()} p={top_p:.6g}: {n} experts over {layers} layers "
          f"({n / max(layers, 1):.2f}/layer{params}) -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
