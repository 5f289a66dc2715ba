"""tools/collect_expert_scores.py on converted tiny DeepSeek checkpoints, checked against transformers' own
DeepseekV2 / DeepseekV3 models: their router outputs on the same tokens, scored in numpy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from routing_fixtures import REPO

from megatron_esft.parallel import ParallelConfig

COLLECT = str(REPO / "tools" / "collect_expert_scores.py")
SELECT = str(REPO / "tools" / "select_experts.py")
MAX_TOKENS, SEQ = 300, 48
WORDS = ("the cat sat on a mat and the dog ran to the park while we play music all day long because it is "
         "fun to learn new things every morning").split()


def _data(path):
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for _ in range(40):
            q = " ".join(rng.choice(WORDS, rng.integers(3, 12)))
            a = " ".join(rng.choice(WORDS, rng.integers(2, 9)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return path


def _run(args, nproc=1):
    # drop the rendezvous variables an in-process test may have set (the child must start its own group)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + list(map(str, args)), capture_output=True, text=True, timeout=300, env=env)


def _hf_reference(hf_dir, load_dir, data, arch):
    """Counts / gate sums from transformers' routers over exactly the tokens the tool counted."""
    import transformers

    from megatron_esft.data import build_sft_datasets, load_tokenizer
    from megatron_esft.routing.collect import plan_micro_batches

    tokenizer = load_tokenizer(os.path.join(load_dir, "hf_assets"))
    dataset, _ = build_sft_datasets([str(data)], tokenizer=tokenizer, seq_length=SEQ, pack=True, seed=1234)
    plan = plan_micro_batches(dataset, MAX_TOKENS, 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    records = {}
    for idx, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, idx=idx: records.setdefault(idx, []).append((out[0].double(), out[2])))
    counted = []
    with torch.no_grad():
        for batch in plan.micro_batches:
            for tokens, docs, valid in zip(batch["tokens"], batch["document_ids"], batch["valid"]):
                for doc in docs[valid].unique_consecutive():
                    span = docs == doc  # a packed document routes as the document alone (document masks)
                    model(input_ids=tokens[span][None])
                    counted.append(int((span & valid).sum()))
    experts = model.config.n_routed_experts
    out = {}
    for idx, calls in records.items():
        counts, gates, total = np.zeros(experts, np.int64), np.zeros(experts), 0
        for (logits, topk), n in zip(calls, counted):
            logits, topk = logits[:n].numpy(), topk[:n].numpy()
            scores = 1 / (1 + np.exp(-logits)) if arch == "deepseek-v3" else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            np.add.at(counts, topk.ravel(), 1)
            np.add.at(gates, topk.ravel(), np.take_along_axis(scores, topk, 1).ravel())
            total += n
        out[str(idx)] = (counts, gates, total)
    return out


@pytest.mark.parametrize("arch, layers, nproc, extra", [
    ("deepseek-v2", 3, 1, []),
    ("deepseek-v3", 3, 2, ["--expert-model-parallel-size", "2"]),
    # uneven pipeline stages: stage 0 holds the dense layer 0 only (no router), stage 1 MoE layers 1-3
    ("deepseek-v2", 4, 2, ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "3"]),
])
def test_scores_match_transformers_routers(tiny_hf, tmp_path, arch, layers, nproc, extra):
    from megatron_esft.checkpoint.convert import hf_to_mcore

    hf = tiny_hf(arch) if layers == 3 else tiny_hf(arch, layers=layers)
    load = str(tmp_path / "mcore")
    hf_to_mcore(hf, load, ParallelConfig())
    data = _data(tmp_path / "task.jsonl")
    out = tmp_path / "scores"
    if nproc == 1:  # the library entry point, in this process (the CLI runs below under torchrun)
        from megatron_esft.routing.collect import CollectArgs, collect_expert_scores

        collect_expert_scores(CollectArgs(load=load, data=[str(data)], out=str(out), max_tokens=MAX_TOKENS,
                                          seq_length=SEQ, progress=False))
    else:
        proc = _run([COLLECT, "--load", load, "--data", data, "--out", out, "--max-tokens", MAX_TOKENS,
                     "--seq-length", SEQ, "--no-progress", *extra], nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    scores = json.loads((out / "scores.json").read_text())
    assert (out / "scores_token.png").read_bytes()[:4] == b"\x89PNG"
    assert scores["data"]["tokens"] == MAX_TOKENS and scores["model"]["arch"] == arch
    reference = _hf_reference(hf, load, data, arch)
    assert sorted(scores["counts"], key=int) == sorted(reference, key=int) == [str(i) for i in range(1, layers)]
    for layer, (counts, gates, total) in reference.items():
        assert total == MAX_TOKENS == scores["num_tokens"][layer]
        np.testing.assert_array_equal([scores["counts"][layer][str(e)] for e in range(len(counts))], counts)
        np.testing.assert_allclose([scores["gate_sums"][layer][str(e)] for e in range(len(gates))], gates, rtol=2e-5)
        np.testing.assert_allclose([scores["token_scores"][layer][str(e)] for e in range(len(counts))],
                                   counts / (2 * total), rtol=1e-12)

    # select from these scores; refuse to configure a different model with the same MoE shape
    other = tiny_hf("deepseek-v3" if arch == "deepseek-v2" else "deepseek-v2")
    cfg = tmp_path / "cfg.json"
    ok = _run([SELECT, "--scores", out, "--model", load, "--method", "token", "--top-p", "0.5", "--out", cfg])
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(cfg.read_text())["experts"]) == {str(i) for i in range(1, layers)}
    bad = _run([SELECT, "--scores", out, "--model", other, "--method", "token", "--out", tmp_path / "x.json"])
    assert bad.returncode == 2 and "different model" in bad.stderr and "arch" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


def test_collect_bad_input_one_line(tmp_path):
    for args, fragment in ((["--max-tokens", "0"], "--max-tokens must be >= 1"),
                           (["--gate", "soft"], "unknown gate kind 'soft'")):
        proc = _run([COLLECT, "--load", tmp_path, "--data", "x.jsonl", "--out", tmp_path / "o", *args])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.split('error: ')[1].strip()}"]
        assert fragment in proc.stderr and not (tmp_path / "o").exists()
    proc = _run([COLLECT, "--load", tmp_path / "nope", "--data", "x.jsonl", "--out", tmp_path / "o"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    proc = _run([COLLECT, "--load", tmp_path, "--data", "1", "task.jsonl", "1", "align.jsonl", "--out", tmp_path / "o"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --data takes paths only: experts are scored on the task data itself (a weighted blend is for "
        "pretrain_esft.py --train-data)"]
    (tmp_path / "file").write_text("mine")
    proc = _run([COLLECT, "--load", tmp_path, "--data", "x.jsonl", "--out", tmp_path / "file"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'file'}: exists and is not a directory (scores.json is written into --out)"]
    assert (tmp_path / "file").read_text() == "mine"
