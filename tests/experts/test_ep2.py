"""EP=2 (torchrun, 2 ranks, gloo): grouped experts load an EP=1 SequentialMLP checkpoint and match its loss and expert
gradients (and SequentialMLP at EP=2); their EP=2 checkpoint loads back into an EP=1 SequentialMLP model."""

import os
import subprocess
import sys

import torch
from tiny import batch, build_model, expert_grads, freeze_sequential, loss_of, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ep2_matches_ep1(mcore, tmp_path):
    from megatron.core import dist_checkpointing

    config = tiny_config()
    torch.manual_seed(0)
    ref = build_model(config, grouped=False)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(ref.sharded_state_dict(), str(tmp_path / "ckpt"))
    freeze_sequential(ref, {2: list(range(8))})
    loss = loss_of(ref, batch(seed=5))
    loss.backward()
    grads = {f"{layer}.{j}.{proj}": g for (layer, j, proj), g in expert_grads(ref).items()}
    torch.save({"loss": loss.item(), "grads": grads}, tmp_path / "ref.pt")

    (tmp_path / "ep2").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "ep2_worker.py"), str(tmp_path), str(tmp_path / "ep2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("EP=2 OK") == 2

    torch.manual_seed(1)
    back = build_model(config, grouped=False)  # EP=2 grouped checkpoint -> EP=1 SequentialMLP
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), str(tmp_path / "ep2")), strict=True)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    for key, value in ref_sd.items():
        if value is not None:
            expected = 2 * value if ".experts.local_experts." in key else value
            assert torch.equal(back_sd[key], expected), key
