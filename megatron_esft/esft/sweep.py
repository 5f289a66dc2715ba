"""The top-p sweep (paper §6.2, Fig. 6): for each p, select experts, run ESFT, and record trainable share and
validation loss; then write a table (Markdown + CSV) and a plot.

Each run is a real `select_experts.py` + `pretrain_esft.py` invocation (subprocesses, optionally under torchrun), so
the sweep measures exactly what a user would run.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import subprocess
import sys

from megatron_esft.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class SweepPoint:
    p: float
    experts_selected: int
    trainable_params: int
    total_params: int
    validation_loss: float | None
    train_loss: float | None
    ms_per_iteration: float | None

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


def parse_training_log(log: str) -> dict:
    """Numbers from pretrain_esft.py's Megatron-style log lines."""
    trainable = re.findall(r"trainable params: ([0-9,]+)", log)
    losses = re.findall(r"\| lm loss: ([0-9.eE+-]+)", log)
    best = re.findall(r"best validation loss ([0-9.eE+-]+)", log)
    validation = re.findall(r"validation loss at iteration \d+ \| lm loss value: ([0-9.eE+-]+)", log)
    times = sorted(float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", log))
    return {
        "trainable_params": int(trainable[-1].replace(",", "")) if trainable else 0,
        "train_loss": float(losses[-1]) if losses else None,
        "validation_loss": float(best[-1]) if best else (float(validation[-1]) if validation else None),
        "ms_per_iteration": times[len(times) // 2] if times else None,
    }


def total_parameters(load_dir: str) -> int:
    """Parameters of the model behind a checkpoint (counted on the meta device; no memory)."""
    import torch

    from megatron_esft import parallel as par
    from megatron_esft.checkpoint.mcore_checkpoint import read_meta
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model

    cfg = parse_hf_config(read_meta(load_dir)["hf_config"])
    par.initialize(par.ParallelConfig())
    model = build_model(cfg, params_dtype=torch.float32, meta_device=True)
    return sum(p.numel() for p in model.parameters())


# what the sweep passes to each run itself
SWEEP_OWNED = ("--load", "--save", "--expert-config", "--finetune-mode", "--finetune")


def check_training_arguments(load: str, train_args: list[str], nproc: int) -> None:
    """Parse and validate pretrain_esft.py's arguments as each run will get them, before anything is written: a bad
    or missing flag fails at once, not after the first selection and with a directory left behind."""
    from megatron_esft.training.arguments import build_parser, validate

    for arg in train_args:
        if arg.split("=", 1)[0] in SWEEP_OWNED:
            raise UserError(f"after '--': {arg.split('=', 1)[0]} is set by the sweep for each run; leave it out")
    parser = build_parser()
    parser.prog = "pretrain_esft.py"
    try:
        validate(parser.parse_args(["--load", load, "--save", "(per p)", "--expert-config", "(per p)", *train_args]),
                 nproc)
    except UserError as exc:
        raise UserError(f"after '--': {exc}") from None


def _run(step: str, cmd: list[str], log_path: str) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(log_path, "w", encoding="utf-8") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode:
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        raise UserError(f"{step} failed: {error[-1] if error else 'exit status ' + str(proc.returncode)} "
                        f"(log: {log_path})")
    return proc.stdout + proc.stderr


def run_sweep(scores: str, method: str, ps: list[float], load: str, out: str, train_args: list[str],
              nproc: int = 1) -> list[SweepPoint]:
    check_training_arguments(load, train_args, nproc)
    total = total_parameters(load)
    os.makedirs(out, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    points = []
    for p in ps:
        run_dir = os.path.join(out, f"p_{p:g}")
        os.makedirs(run_dir, exist_ok=True)
        config = os.path.join(run_dir, "expert_config.json")
        select = [sys.executable, os.path.join(ROOT, "tools", "select_experts.py"), "--scores", scores, "--method",
                  method, "--top-p", str(p), "--out", config]
        selection = _run(f"p={p:g}: select_experts.py", select, os.path.join(run_dir, "select.log"))
        selected = re.findall(r"p=[0-9.]+: (\d+) experts", selection)
        train = [*launcher, os.path.join(ROOT, "pretrain_esft.py"), "--load", load, "--save",
                 os.path.join(run_dir, "checkpoint"), "--expert-config", config, *train_args]
        log = _run(f"p={p:g}: pretrain_esft.py", train, os.path.join(run_dir, "train.log"))
        numbers = parse_training_log(log)
        points.append(SweepPoint(p=p, experts_selected=int(selected[0]) if selected else 0, total_params=total,
                                 **numbers))
        print(f"p={p:g}: {points[-1].experts_selected} experts, trainable share {points[-1].trainable_share:.4f}, "
              f"validation loss {points[-1].validation_loss}", flush=True)
    write_outputs(points, method, out)
    return points


def write_outputs(points: list[SweepPoint], method: str, out: str) -> str:
    header = ["p", "experts selected", "trainable params", "trainable share", "validation loss", "final train loss",
              "ms / iteration"]
    rows = [[f"{pt.p:g}", pt.experts_selected, pt.trainable_params, f"{pt.trainable_share:.4f}",
             "-" if pt.validation_loss is None else f"{pt.validation_loss:.4f}",
             "-" if pt.train_loss is None else f"{pt.train_loss:.4f}",
             "-" if pt.ms_per_iteration is None else f"{pt.ms_per_iteration:.1f}"] for pt in points]
    with open(os.path.join(out, "sweep.csv"), "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                      ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# ESFT-{method.capitalize()} top-p sweep\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ps = [pt.p for pt in points]
    ax.plot(ps, [100 * pt.trainable_share for pt in points], "o-", color="tab:blue")
    ax.set_xlabel(f"top-p (ESFT-{method.capitalize()})")
    ax.set_ylabel("trainable parameters (% of model)", color="tab:blue")
    loss = [(pt.p, pt.validation_loss) for pt in points if pt.validation_loss is not None]
    if loss:
        ax2 = ax.twinx()
        ax2.plot([x for x, _ in loss], [y for _, y in loss], "s--", color="tab:red")
        ax2.set_ylabel("validation loss", color="tab:red")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)
    plt.close(fig)
    print(table)
    return table
