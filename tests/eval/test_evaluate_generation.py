"""Generation mode end to end: tiny HF DeepSeek-V2 -> our converter -> `tools/evaluate.py --load` (our Megatron-Core
model, greedy batched generation, scoring, reference-answer loss), checked against transformers' own greedy
`generate` and loss on the same HF checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_esft.models.tiny import TinySpec, make_tiny_deepseek

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["User: turn on the light\n\nAssistant:", "User: weather tomorrow in Paris please\n\nAssistant:",
           "User: hi\n\nAssistant:"]
ANSWERS = ['{"intent": "Light-On", "slots": {}}', '{"intent": "Weather-Query", "slots": {"city": "Paris"}}',
           '{"intent": "Chat", "slots": {}}']
MAX_NEW = 6


def tool(name, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("generation")
    hf, ckpt = str(work / "hf"), str(work / "ckpt")
    make_tiny_deepseek(TinySpec(arch="deepseek-v2", seed=7), hf)  # in-process: no Megatron-Core import needed
    tool("convert_hf_to_mcore.py", "--hf", hf, "--out", ckpt)
    eval_path = work / "eval.jsonl"
    with open(eval_path, "w", encoding="utf-8") as handle:
        for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
            handle.write(json.dumps({"idx": i, "prompt": prompt, "raw_answers": [answer], "answers": [answer]}) + "\n")
    completions = work / "completions.jsonl"
    summary = json.loads(tool("evaluate.py", "--task", "intent", "--load", ckpt, "--tokenizer", hf,
                              "--eval-data", str(eval_path), "--max-new-tokens", str(MAX_NEW),
                              "--eval-batch-size", "2", "--completions-out", str(completions), "--json"))
    records = [json.loads(line) for line in open(completions, encoding="utf-8")]
    return hf, summary, records


def test_generated_text_matches_transformers_greedy(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, summary, records = run
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS:
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        expected.append(tok.decode(out, skip_special_tokens=True))
    assert [r["idx"] for r in records] == [0, 1, 2]
    assert [r["prediction"] for r in records] == expected
    assert summary["samples"] == 3 and summary["correct"] == 0  # random weights cannot produce the JSON answers


def test_reference_loss_matches_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, summary, _ = run
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for prompt, answer in zip(PROMPTS, ANSWERS):
        prompt_ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        answer_ids = tok.encode(" " + answer, add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for position in range(len(prompt_ids) - 1, ids.shape[1] - 1):
            total -= float(log_probs[position, ids[0, position + 1]])
            count += 1
    assert summary["reference_tokens"] == count
    assert summary["reference_loss"] == pytest.approx(total / count, rel=1e-4)
