"""Fixtures for the training tests: a tiny DeepSeek-V2 (HF + converted base checkpoint), SFT data, expert configs,
and the ESFT reference run (EP=1) that several tests compare against. Everything is made once per session. The
helpers they use are in training_helpers.py.
"""

from __future__ import annotations

import json

import pytest
from training_helpers import ECFG, REFERENCE_SCHEDULE, WORDS, losses, pretrain, run, to_hf


@pytest.fixture(scope="session")
def training_env(tmp_path_factory):
    """Paths of the tiny model, its base checkpoint, data and expert config."""
    from megatron_esft.models.tiny import TinySpec, make_tiny_deepseek

    root = tmp_path_factory.mktemp("training")
    hf = str(root / "hf")
    make_tiny_deepseek(TinySpec(arch="deepseek-v2", layers=4, hidden=64, experts=8, topk=2, moe_ffn=32, vocab=512,
                                seed=3), hf)
    base = str(root / "base")
    run(["tools/convert_hf_to_mcore.py", "--hf", hf, "--out", base])
    import random

    rng = random.Random(0)
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for _ in range(48):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    ecfg = root / "expert_config.json"
    ecfg.write_text(json.dumps(ECFG))
    return {"root": root, "hf": hf, "base": base, "data": str(data), "ecfg": str(ecfg)}


@pytest.fixture(scope="session")
def reference(training_env):
    """ESFT at EP=1 (grouped experts), 6 iterations straight, validation at 0/3/6 (keep-best), checkpoints at 3 and 6,
    TensorBoard, --log-throughput, --log-params-norm and --log-num-zeros-in-grad, plus HF exports of both."""
    env = training_env
    save = str(env["root"] / "ref")
    proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *REFERENCE_SCHEDULE,
                    "--tensorboard-dir", str(env["root"] / "tb"), "--log-throughput",
                    "--log-params-norm", "--log-num-zeros-in-grad", data=env["data"])
    hf3 = to_hf(save, str(env["root"] / "ref-hf-3"), iteration=3)
    hf6 = to_hf(save, str(env["root"] / "ref-hf-6"))
    return {"save": save, "proc": proc, "losses": losses(proc), "hf3": hf3, "hf6": hf6,
            "hf6_dir": str(env["root"] / "ref-hf-6")}
