"""Training where apex imports (NGC images): the same run as without it.

apex cannot be installed on a CPU machine, so a stand-in package named `apex` goes on the path. Megatron-Core decides
by importing it: `import apex` selects apex's FusedLayerNorm for the local spec, and `apex.optimizers.FusedAdam`
becomes the Adam of its (distributed) optimizer, with FusedAdam's `step` handling in optimizer checkpoints. The
stand-in FusedAdam refuses to be built, so a run that picks it fails."""

import os
import subprocess

import torch

from training_helpers import PY, REPO, TRAIN, _env, load_mcore, losses

FAKE_OPTIMIZERS = '''
class FusedAdam:  # stands in for apex's CUDA FusedAdam
    def __init__(self, *args, **kwargs):
        raise RuntimeError("apex FusedAdam was selected")


FusedSGD = FusedAdam
'''


def _pretrain_with_apex(fake_root, *args):
    env = _env(2)
    env["PYTHONPATH"] = os.pathsep.join([str(fake_root), env["PYTHONPATH"]])
    proc = subprocess.run([PY, "pretrain_esft.py", *TRAIN, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_esft_with_apex_importable_trains_and_resumes_like_without(training_env, reference, tmp_path):
    fake = tmp_path / "site"
    (fake / "apex").mkdir(parents=True)
    (fake / "apex" / "__init__.py").write_text("")
    (fake / "apex" / "optimizers.py").write_text(FAKE_OPTIMIZERS)
    env, save = training_env, tmp_path / "run"
    first = _pretrain_with_apex(fake, "--load", env["base"], "--save", save, "--train-data", env["data"],
                                "--expert-config", env["ecfg"], "--train-iters", "6", "--exit-interval", "3",
                                "--eval-interval", "3")
    second = _pretrain_with_apex(fake, "--load", save, "--save", save, "--train-data", env["data"],
                                 "--train-iters", "6", "--eval-interval", "3")
    assert "resumed from" in second.stdout
    assert losses(first) + losses(second) == reference["losses"]
    straight, resumed = load_mcore(reference["save"], 6), load_mcore(str(save), 6)
    assert set(straight) == set(resumed)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
