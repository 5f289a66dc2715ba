"""Regenerate docs/cli.md from the tools' own --help (run after changing a command line):

    .venv/bin/python docs/make_cli_reference.py
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["make_tiny_deepseek", "convert_hf_to_mcore", "convert_mcore_to_hf", "compare_logits", "preprocess_data",
         "collect_expert_scores", "select_experts", "plot_expert_scores", "sweep_top_p", "export_esft",
         "diff_checkpoints", "evaluate"]


def main():
    parts = ["# Command-line reference", "",
             "Generated from each command's `--help` by `docs/make_cli_reference.py`. Every command exits with status 2 "
             "and a one-line `error: ...` on bad input and writes its outputs atomically.", ""]
    entries = [("pretrain_esft.py", os.path.join(ROOT, "pretrain_esft.py"))]
    entries += [(f"tools/{t}.py", os.path.join(ROOT, "tools", f"{t}.py")) for t in TOOLS]
    for name, path in entries:
        if not os.path.exists(path):
            continue
        proc = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, COLUMNS="110"))
        parts += [f"## `{name}`", "", "```", proc.stdout.strip(), "```", ""]
    with open(os.path.join(ROOT, "docs", "cli.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))


if __name__ == "__main__":
    main()
