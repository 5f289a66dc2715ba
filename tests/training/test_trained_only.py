"""--save-trained-weights-only: checkpoints with the trained experts only (checkpoint/trained_only.py). The reference
run saved that way trains identically, exports the same HF model and adapter bit for bit, resumes exactly (also
under EP=2), starts a --finetune run, and a missing base checkpoint is a one-line error."""

import json
import os
import re
import shutil

import torch

from training_helpers import (REFERENCE_SCHEDULE, SELECTED, load_hf, load_mcore, losses, pretrain, run,
                              selected_name, to_hf)


def _size(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_trained_only_checkpoints(training_env, reference, tmp_path):
    env, save = training_env, str(tmp_path / "thin")
    proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], *REFERENCE_SCHEDULE,
                    "--save-trained-weights-only", data=env["data"])
    assert losses(proc) == reference["losses"]
    for it in (3, 6):
        with open(os.path.join(save, f"iter_{it:07d}", "esft_meta.json")) as fh:
            meta = json.load(fh)
        assert meta["model_weights"] == "trained"
        assert meta["base_checkpoint"] == {"load": os.path.abspath(env["base"]), "iteration": 0}
        # the model part: one key per selected expert and projection, nothing frozen
        stored = load_mcore(save, it)
        key = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.experts\.linear_(fc1|fc2)\.weight\.expert(\d+)")
        experts = {(int(m.group(1)), int(m.group(3))) for m in map(key.fullmatch, stored)}
        assert experts == SELECTED and len(stored) == 2 * len(SELECTED), sorted(stored)
        assert _size(os.path.join(save, f"iter_{it:07d}")) < _size(os.path.join(reference["save"], f"iter_{it:07d}"))
    # the merged HF model and the adapter: the reference's, bit for bit (frozen weights from the base checkpoint)
    for it, ref in ((3, reference["hf3"]), (6, reference["hf6"])):
        hf = to_hf(save, str(tmp_path / f"hf{it}"), iteration=it)
        assert set(hf) == set(ref)
        for name, tensor in ref.items():
            assert torch.equal(hf[name], tensor), (it, name)
    run(["tools/export_esft.py", "--load", save, "--out", str(tmp_path / "adapter")])
    adapter = load_hf(str(tmp_path / "adapter"))
    assert sorted(adapter) == sorted(n for n in reference["hf6"] if selected_name(n))
    assert all(torch.equal(t, reference["hf6"][n]) for n, t in adapter.items())

    # resume from iteration 3 exactly; and at EP=2 (each rank reads its own experts' keys)
    resumed = pretrain(save, None, "--ckpt-step", "3", "--train-iters", "6", "--eval-interval", "3",
                       data=env["data"])
    assert losses(resumed) == reference["losses"][3:]
    ep2 = pretrain(save, None, "--ckpt-step", "3", "--train-iters", "4", "--expert-model-parallel-size", "2",
                   nproc=2, data=env["data"])
    assert abs(losses(ep2)[0] - reference["losses"][3]) <= 1e-5 * reference["losses"][3]

    # --finetune from it: the model weights of iteration 6 (base + trained experts), unchanged at --lr 0
    ft = str(tmp_path / "ft")
    pretrain(save, ft, "--finetune", "--finetune-mode", "full", "--train-iters", "1", "--lr", "0", "--min-lr", "0",
             data=env["data"])
    loaded, expected = load_mcore(ft, 1), load_mcore(reference["save"], 6)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    # the frozen weights live in the base checkpoint: without it, a one-line error
    moved = tmp_path / "moved"
    shutil.copytree(save, moved)
    meta_path = moved / "iter_0000006" / "esft_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base_checkpoint"]["load"] = str(tmp_path / "gone")
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "no-hf"
    failed = run(["tools/convert_mcore_to_hf.py", "--load", str(moved), "--out", str(out)], check=False)
    assert failed.returncode == 2 and not out.exists() and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {moved / 'iter_0000006'}: holds only the trained weights, and its base checkpoint "
        f"{tmp_path / 'gone'} (iteration 0) with the frozen ones is not there any more")
    resumed = pretrain(str(moved), None, "--train-iters", "7", data=env["data"], check=False)
    assert resumed.returncode == 2 and resumed.stderr.strip().splitlines()[-1] == failed.stderr.strip().splitlines()[-1]
