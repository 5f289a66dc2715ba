"""`make demo`: the whole ESFT pipeline on an embedded tiny DeepSeek-V2, on CPU, in a few minutes.

Steps (every output under --out, default runs/demo):
 1. a tiny random DeepSeek-V2 (MLA, 1 dense + 3 MoE layers, 16 routed experts, top-2, 2 shared experts);
 2. a short full pre-training on a 1:1 mixture of two very different tasks (intent: short commands -> JSON; law:
    case descriptions -> judgments; small subsets of the official ESFT data in examples/tiny/data), so the tiny model
    gets real routing structure; converted back to HF and re-imported as the "base model" of the rest;
 3. routing statistics of each task on the base model, Gate scores, and their concentration/overlap;
 4. expert selection for intent (ESFT-Gate, p = 0.1) and a heatmap PNG;
 5. ESFT training on intent (TensorBoard), and full fine-tuning (FFT) with the same budget as the baseline;
 6. the ESFT adapter and the merged HF model;
 7. validation loss on both tasks before/after, and the intent exact-match score from greedy generation;
 8. a report (report.md) with what was measured.
Nothing here asserts an outcome: the report prints what this run measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "tiny", "data")
sys.path.insert(0, ROOT)

PY = sys.executable
TRAIN_ARGS = ["--micro-batch-size", "4", "--global-batch-size", "8", "--seq-length", "384", "--log-interval", "25",
              "--weight-decay", "0.1", "--seed", "1234"]


def run(step: str, cmd: list[str], log_dir: str) -> str:
    """Run one pipeline step, teeing its output to log_dir/<step>.log; stop the demo if it fails."""
    print(f"\n=== {step}: {' '.join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    with open(os.path.join(log_dir, f"{step}.log"), "w", encoding="utf-8") as fh:
        fh.write(output)
    keep = ("iteration", "validation", "wrote", "saved", "ESFT-", "best", "max_abs_diff", "collected", "resumed",
            "trainable", "score", "error")
    for line in [line for line in output.splitlines() if any(k in line for k in keep)][-8:]:
        print("   " + line.strip()[:220])
    if proc.returncode:
        sys.exit(f"demo step '{step}' failed (exit {proc.returncode}); full log: {log_dir}/{step}.log")
    print(f"   ({time.perf_counter() - start:.1f} s)")
    return output


def iteration_times(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", log)]


def last_loss(log: str) -> float | None:
    losses = re.findall(r"lm loss: ([0-9.eE+-]+)", log)
    return float(losses[-1]) if losses else None


def concentration(scores: dict, layer: str, k: int) -> float:
    values = sorted(scores[layer].values(), reverse=True)
    total = sum(values)
    return sum(values[:k]) / total if total else 0.0


def overlap(a: dict, b: dict, layer: str, k: int) -> int:
    top = lambda s: {e for e, _ in sorted(s[layer].items(), key=lambda kv: -kv[1])[:k]}  # noqa: E731
    return len(top(a) & top(b))


def validation_losses(load_dir: str, tokenizer_dir: str, tasks: dict[str, str], limit: int) -> dict[str, float]:
    code = (
        "import json,sys\n"
        "from megatron_esft.eval.inference import load_forward, load_tokenizer\n"
        "from megatron_esft.eval.loss import reference_answer_loss\n"
        "forward = load_forward(sys.argv[1]); tok = load_tokenizer(sys.argv[2]); out = {}\n"
        "for task, path in json.loads(sys.argv[3]).items():\n"
        "    rows = [json.loads(l) for l in open(path, encoding='utf-8') if l.strip()][: int(sys.argv[4])]\n"
        "    res = reference_answer_loss(forward, tok, [r['prompt'] for r in rows], [r['answers'][0] if isinstance(r['answers'], list) else r['answers'] for r in rows], batch_size=4)\n"
        "    out[task] = res['loss']\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    proc = subprocess.run([PY, "-c", code, load_dir, tokenizer_dir, json.dumps(tasks), str(limit)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
        sys.exit(f"validation loss failed for {load_dir}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pretrain-iters", type=int, default=300)
    parser.add_argument("--finetune-iters", type=int, default=150)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--method", choices=["gate", "token"], default="gate")
    parser.add_argument("--top-p", type=float, default=0.1)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs)
    p = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    tool = lambda name: os.path.join(ROOT, "tools", f"{name}.py")  # noqa: E731
    intent_train, law_train = os.path.join(DATA, "intent_train.jsonl"), os.path.join(DATA, "law_train.jsonl")
    # held-out conversations of each task in the official eval-record format (zero-shot "User: ...\n\nAssistant:")
    evals = {"intent": os.path.join(DATA, "intent_heldout.jsonl"), "law": os.path.join(DATA, "law_heldout.jsonl")}
    started = time.perf_counter()

    run("make_tiny", [PY, tool("make_tiny_deepseek"), "--arch", "deepseek-v2", "--out", p("hf_random"), "--layers", "4",
                      "--hidden", "64", "--experts", "16", "--topk", "2", "--moe-ffn", "32", "--vocab", "512"], logs)
    run("convert_random", [PY, tool("convert_hf_to_mcore"), "--hf", p("hf_random"), "--out", p("random_mcore")], logs)
    # law samples are repeated so the mixture is about 1:1 in samples (600 intent, 4 x 160 law)
    run("pretrain_mixture", [PY, os.path.join(ROOT, "pretrain_esft.py"), "--load", p("random_mcore"), "--save",
                             p("pretrained"), "--train-data", intent_train, law_train, law_train, law_train, law_train,
                             "--finetune-mode", "full", "--train-iters", str(args.pretrain_iters),
                             "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(20, args.pretrain_iters)),
                             *TRAIN_ARGS], logs)
    run("export_base", [PY, tool("convert_mcore_to_hf"), "--load", p("pretrained"), "--out", p("hf_base")], logs)
    run("convert_base", [PY, tool("convert_hf_to_mcore"), "--hf", p("hf_base"), "--out", p("base")], logs)
    run("compare_logits", [PY, tool("compare_logits"), "--hf", p("hf_base"), "--load", p("base")], logs)

    scores = {}
    for task, data in (("intent", intent_train), ("law", law_train)):
        run(f"collect_{task}", [PY, tool("collect_expert_scores"), "--load", p("base"), "--data", data, "--out",
                                p(f"scores_{task}"), "--max-tokens", "16384", "--seq-length", "384",
                                "--tensorboard-dir", p("tensorboard", f"scores_{task}"), "--no-progress"], logs)
        with open(p(f"scores_{task}", "scores.json"), encoding="utf-8") as fh:
            scores[task] = json.load(fh)
    run("select", [PY, tool("select_experts"), "--scores", p("scores_intent"), "--method", args.method, "--top-p",
                   str(args.top_p), "--model", p("hf_base"), "--out", p("expert_config.json")], logs)
    run("plot", [PY, tool("plot_expert_scores"), "--scores", p("scores_intent"), "--method", args.method,
                 "--expert-config", p("expert_config.json"), "--out", p("heatmap_intent.png")], logs)

    finetune = ["--train-data", intent_train, "--split", "90,10", "--eval-interval", str(min(50, args.finetune_iters)),
                "--train-iters", str(args.finetune_iters), "--lr", "1e-3", *TRAIN_ARGS]
    esft_log = run("train_esft", [PY, os.path.join(ROOT, "pretrain_esft.py"), "--load", p("base"), "--save", p("esft"),
                                  "--expert-config", p("expert_config.json"), "--tensorboard-dir",
                                  p("tensorboard", "esft"), *finetune], logs)
    fft_log = run("train_fft", [PY, os.path.join(ROOT, "pretrain_esft.py"), "--load", p("base"), "--save", p("fft"),
                                "--finetune-mode", "full", "--tensorboard-dir", p("tensorboard", "fft"), *finetune], logs)
    run("export_adapter", [PY, tool("export_esft"), "--load", p("esft"), "--out", p("adapter")], logs)
    run("export_merged", [PY, tool("convert_mcore_to_hf"), "--load", p("esft"), "--out", p("merged_hf")], logs)

    losses = {name: validation_losses(p(name), p("hf_base"), evals, args.eval_samples) for name in ("base", "esft", "fft")}
    subset = p("intent_eval_subset.jsonl")
    with open(evals["intent"], encoding="utf-8") as src, open(subset, "w", encoding="utf-8") as dst:
        dst.writelines(line for _, line in zip(range(args.eval_samples), src))
    intent_em = {}
    for name in ("base", "esft", "fft"):
        result = run(f"evaluate_{name}", [PY, tool("evaluate"), "--task", "intent", "--load", p(name), "--tokenizer",
                                          p("hf_base"), "--eval-data", subset, "--max-new-tokens", "64", "--eval-batch-size", "20",
                                          "--json", "--completions-out", p(f"completions_{name}.jsonl")], logs)
        intent_em[name] = json.loads([line for line in result.splitlines() if line.startswith("{")][-1])

    write_report(out, args, scores, losses, intent_em, esft_log, fft_log, time.perf_counter() - started)


def write_report(out, args, scores, losses, intent_em, esft_log, fft_log, seconds):
    with open(os.path.join(out, "expert_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    key = "gate_scores" if args.method == "gate" else "token_scores"
    layers = sorted(scores["intent"][key], key=int)
    experts = len(scores["intent"][key][layers[0]])
    selected = sum(len(v) for v in config["experts"].values())
    lines = [
        "# megatron_esft demo report",
        "",
        f"Tiny DeepSeek-V2 (MLA, {len(layers)} MoE layers x {experts} routed experts, top-2), CPU, {seconds / 60:.1f} min.",
        "",
        "## Routing structure of the base model (Gate scores)",
        "",
        "| layer | intent: top-2 share | law: top-2 share | top-4 experts shared by the tasks |",
        "|---|---|---|---|",
    ]
    for layer in layers:
        lines.append(f"| {layer} | {concentration(scores['intent'][key], layer, 2):.2f} | "
                     f"{concentration(scores['law'][key], layer, 2):.2f} | "
                     f"{overlap(scores['intent'][key], scores['law'][key], layer, 4)} of 4 |")
    lines += [
        "",
        f"(A uniform router would give a top-2 share of {2 / experts:.2f} and share ~{4 * 4 / experts:.1f} of 4 experts.)",
        "",
        f"## ESFT-{args.method.capitalize()} selection (p = {args.top_p})",
        "",
        f"{selected} of {len(layers) * experts} routed experts selected "
        f"({', '.join(f'layer {k}: {sorted(v)}' for k, v in sorted(config['experts'].items(), key=lambda kv: int(kv[0])))}).",
        "",
        "## Fine-tuning on intent (same steps, data and learning rate)",
        "",
        "| model | trainable params | ms / iteration (median) | final train loss | intent held-out loss | "
        "law held-out loss | intent exact match (%) | intent name accuracy (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, log in (("base", None), ("esft", esft_log), ("fft", fft_log)):
        times = sorted(iteration_times(log)) if log else []
        trainable = re.findall(r"trainable params: ([0-9,]+)", log or "")
        lines.append(
            f"| {name} | {trainable[-1] if trainable else '-'} | {times[len(times) // 2] if times else '-'} | "
            f"{last_loss(log) if log else '-'} | {losses[name]['intent']:.3f} | {losses[name]['law']:.3f} | "
            f"{intent_em[name].get('score', '-')} | {intent_em[name].get('intent_accuracy', '-')} |")
    lines += [
        "",
        "Held-out losses: mean answer-token loss on conversations of each task that no training step saw "
        "(`examples/tiny/data/*_heldout.jsonl`); exact match: the official intent scorer on greedy generations.",
        "",
        "Files: `hf_base/` (base model, HF), `base/` (Megatron base checkpoint), `scores_*/scores.json`, "
        "`expert_config.json`, `heatmap_intent.png`, `esft/`, `fft/` (training checkpoints), `adapter/` (official ESFT "
        "adapter), `merged_hf/` (merged HF model), `tensorboard/` (`tensorboard --logdir " + os.path.join(out, "tensorboard") + "`), `logs/`.",
    ]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
