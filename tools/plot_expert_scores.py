"""Draw a layers x experts heatmap of expert scores, with the selected experts outlined in red.

    python tools/plot_expert_scores.py --scores PATH --method token [--expert-config FILE.json | --top-p P] \
        --out FILE.png|.pdf|.svg

`--scores` takes scores.json, an official summary.json, or a directory holding one; `--official-logs DIR` reads the
official routing logs instead. The selection shown is `--expert-config` if given, else the top-p selection.
"""

import _bootstrap  # noqa: F401

from megatron_esft.errors import UserError, run_cli
from megatron_esft.esft.expert_config import ModelShape, load_expert_config
from megatron_esft.routing.cli import ArgumentParser, unit_interval
from megatron_esft.routing.plot import image_format, save_heatmap
from megatron_esft.routing.scores import METHODS, load_scores, read_official_logs
from megatron_esft.routing.selection import select_top_p


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="scores.json / official summary.json, or a directory holding one")
    source.add_argument("--official-logs", metavar="DIR", help="official routing logs expert_weights_{layer}.txt")
    parser.add_argument("--topk", type=int, default=6, help="routed experts per token in --official-logs")
    parser.add_argument("--method", default="token", help="token or gate")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--expert-config", help="expert config JSON whose experts are outlined")
    selection.add_argument("--top-p", type=unit_interval, help="outline the top-p selection (default 0.2 / 0.1)")
    parser.add_argument("--out", required=True, help="image file to write: .png, .pdf or .svg")
    args = parser.parse_args(argv)
    image_format(args.out)  # before the scores are read
    if args.method not in METHODS:
        raise UserError(f"--method: unknown scoring method {args.method!r} (choose from {', '.join(METHODS)})")
    scores = read_official_logs(args.official_logs, topk=args.topk) if args.official_logs else load_scores(args.scores)
    if args.expert_config:
        shape = ModelShape(tuple(scores.layers), scores.num_experts, source=scores.source)
        selected = load_expert_config(args.expert_config, shape).experts
    else:
        selected = select_top_p(scores, args.method, args.top_p or {"token": 0.2, "gate": 0.1}[args.method])
    save_heatmap(args.out, scores, args.method, selected)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
