"""--check-for-nan-in-loss-and-grad (on by default): a NaN/Inf loss or gradient norm stops the run before the
optimizer step, with one line naming the iteration and the last checkpoint; nothing of that iteration is saved.

In-process: the trainer's own model, freezing, DDP and Megatron-Core optimizer with a NaN planted in one trained
expert's gradient (the loss stays finite), with and without the check. Through the CLI: a learning rate that blows
the trained experts up after iteration 1."""

import math
import os

import pytest
import torch

from training_helpers import load_mcore, run
from megatron_esft.training.finite_check import NonFiniteGradNorm, check_grad_norm_before_update

BLOW_UP = ["--micro-batch-size", "1", "--global-batch-size", "2", "--seq-length", "48", "--lr", "1e30",
           "--log-interval", "1", "--train-iters", "4"]


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _trainer_pieces(training_env, clip_grad, *extra):
    """Model, DDP and optimizer as pretrain_esft.py builds them (ESFT of ECFG's experts, fp32 on CPU)."""
    from megatron_esft.checkpoint import training_state as ts
    from megatron_esft.esft import freeze
    from megatron_esft.esft.expert_config import ModelShape, load_expert_config
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.parallel import ParallelConfig
    from megatron_esft.training import setup
    from megatron_esft.training.arguments import build_parser, validate

    args = validate(build_parser().parse_args(
        ["--load", training_env["base"], "--train-data", training_env["data"], "--train-iters", "1", "--seq-length",
         "16", "--lr", "1e-2", "--clip-grad", str(clip_grad), "--expert-config", training_env["ecfg"], *extra]), 1)
    iteration, meta = ts.describe_load(args.load)
    cfg = parse_hf_config(meta["hf_config"])
    model = setup.build_trainable_model(args, cfg, ParallelConfig())
    ts.load_model_only(args.load, iteration, model)
    ecfg = load_expert_config(args.expert_config, ModelShape.from_hf_dict(meta["hf_config"]))
    freeze.apply_finetune_mode(model, "esft", ecfg)
    ddp = setup.wrap_ddp(model)
    return model, ddp, setup.build_optimizer(args, ddp)


def _backward_with_a_nan_gradient(model, ddp):
    from megatron.core.distributed import finalize_model_grads

    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (1, 16))
    positions = torch.arange(16).unsqueeze(0)
    ddp.zero_grad_buffer()
    loss = ddp(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(hasattr(p, "main_grad") for p in trained)
    trained[0].main_grad.view(-1)[0] = float("nan")  # one element of one trained expert's gradient
    return math.isfinite(loss.item())


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_a_nan_gradient_stops_the_step_before_any_update(mcore, training_env, clip_grad):
    model, ddp, optimizer = _trainer_pieces(training_env, clip_grad)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert _backward_with_a_nan_gradient(model, ddp)  # the loss itself is finite: only the gradient check sees it
    with pytest.raises(NonFiniteGradNorm, match="grad norm is nan"):
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    from megatron_esft.checkpoint.training_state import live_optimizers

    assert list(live_optimizers(optimizer))
    for live in live_optimizers(optimizer):
        assert not live.optimizer.state, "Adam state written although the step was stopped"


def test_only_megatron_cores_chained_optimizer_is_guarded(mcore, training_env):
    _, _, optimizer = _trainer_pieces(training_env, 1.0)
    with pytest.raises(TypeError, match="ChainedOptimizer"):
        check_grad_norm_before_update(optimizer.chained_optimizers[0])


def test_without_the_check_the_nan_reaches_the_trained_weights(mcore, training_env):
    model, ddp, optimizer = _trainer_pieces(training_env, 1.0, "--no-check-for-nan-in-loss-and-grad")
    _backward_with_a_nan_gradient(model, ddp)
    _, grad_norm, _ = optimizer.step()
    assert math.isnan(grad_norm)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(torch.isnan(p).any() for p in trained)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert not any(torch.isnan(p).any() for p in frozen)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(training_env, tmp_path):
    save = tmp_path / "blown"
    args = ["pretrain_esft.py", "--load", training_env["base"], "--save", str(save), "--train-data",
            training_env["data"], "--expert-config", training_env["ecfg"], *BLOW_UP, "--save-interval", "1"]
    proc = run(args, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f"error: iteration 2: lm loss is nan; stopped before the optimizer step"), errors
    assert f"last checkpoint: iteration 1 in {save}" in errors[-1]
    assert "Traceback" not in proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    for name, tensor in load_mcore(str(save), 1).items():
        assert torch.isfinite(tensor).all(), name

    # Megatron-LM's switch: training goes on through the NaN and saves at the end
    off = tmp_path / "unchecked"
    proc = run(["pretrain_esft.py", "--load", training_env["base"], "--save", str(off), "--train-data",
                training_env["data"], "--expert-config", training_env["ecfg"], *BLOW_UP,
                "--no-check-for-nan-in-loss-and-grad"])
    assert "lm loss: NAN" in proc.stdout
    assert (off / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert os.path.isdir(off / "iter_0000004")
