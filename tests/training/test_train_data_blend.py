"""pretrain_esft.py --train-data WEIGHT PATH ... (a weighted blend): logged, trained, and resumed exactly."""

import json
import re

import pytest

from training_helpers import WORDS, losses, pretrain


@pytest.fixture(scope="module")
def second_source(training_env):
    path = training_env["root"] / "alignment.jsonl"
    with open(path, "w") as fh:
        for i in range(200):
            words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(4)]
            fh.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words[:2])},
                                              {"role": "assistant", "content": " ".join(words[2:])}]}) + "\n")
    return str(path)


def test_blend_trains_and_resumes_exactly(training_env, second_source, tmp_path):
    env = training_env
    blend = ["--train-data", "1", env["data"], "1", second_source]
    extra = ["--expert-config", env["ecfg"], "--train-iters", "4", *blend]
    straight = pretrain(env["base"], str(tmp_path / "straight"), *extra, data=env["data"])
    line = re.search(rf"^train data blend: 50.0% {re.escape(env['data'])} \((\d+) documents, (\d+) per epoch\), "
                     rf"50.0% {re.escape(second_source)} \((\d+) documents, (\d+) per epoch\)$", straight.stdout, re.M)
    assert line, straight.stdout[-3000:]
    n_task, per_task, n_align, per_align = map(int, line.groups())
    assert n_task + n_align == round(0.9 * (48 + 200)) and n_task < 48 and n_align < 200  # --split 90,10 of both
    assert per_task == per_align == round(0.5 * (n_task + n_align))
    first = pretrain(env["base"], str(tmp_path / "resumed"), *extra, "--exit-interval", "2", data=env["data"])
    second = pretrain(str(tmp_path / "resumed"), str(tmp_path / "resumed"), *extra, data=env["data"])
    assert len(losses(straight)) == 4
    assert losses(first) + losses(second) == losses(straight)
    # another blend is another stream: resuming with it is refused
    other = pretrain(str(tmp_path / "resumed"), None, "--expert-config", env["ecfg"], "--train-iters", "6",
                     "--train-data", "3", env["data"], "1", second_source, data=env["data"], check=False)
    assert other.returncode == 2, other.stdout[-2000:]
