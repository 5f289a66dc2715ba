"""Which tensors of a Hugging Face checkpoint differ from another's (bit for bit), e.g. a merged ESFT export against
its base; with --expert-config, whether they are exactly the selected experts (exit status 1 if not).

    python tools/diff_checkpoints.py --base BASE_HF --other MERGED_HF [--expert-config expert_config.json] [--json]
"""

import _bootstrap  # noqa: F401

from megatron_esft.errors import ArgumentParser, run_cli


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="HF checkpoint directory to compare against")
    parser.add_argument("--other", required=True, help="HF checkpoint directory of the same model")
    parser.add_argument("--expert-config", default=None,
                        help="check that only what this expert config trains changed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    import json

    from megatron_esft.checkpoint.diff import diff_checkpoints, mismatch_with_expert_config
    from megatron_esft.errors import RunStopped
    from megatron_esft.esft.expert_config import ModelShape, load_expert_config

    ecfg = None
    if args.expert_config:  # read before the (long) comparison: a bad file fails at once
        ecfg = load_expert_config(args.expert_config, ModelShape.from_hf_config(args.other))
    diff = diff_checkpoints(args.base, args.other)
    problem = mismatch_with_expert_config(diff, ecfg) if ecfg is not None else None
    if args.json:
        print(json.dumps(dict(diff.to_json_dict(), matches_expert_config=None if ecfg is None else problem is None)))
    else:
        experts = "; ".join(f"layer {layer}: {', '.join(map(str, ex))}" for layer, ex in
                            sorted(diff.changed_experts.items())) or "none"
        print(f"compared {diff.tensors} tensors of {args.other} with {args.base}: {len(diff.changed)} differ")
        print(f"  routed experts changed: {experts}")
        print(f"  other tensors changed: {', '.join(diff.changed_other) or 'none'}")
        if ecfg is not None and problem is None:
            print(f"only what --expert-config {args.expert_config} trains changed")
    if problem is not None:
        raise RunStopped(f"{args.other}: {problem} (--expert-config {args.expert_config})")


if __name__ == "__main__":
    run_cli(main)
