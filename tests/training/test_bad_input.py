"""Bad input to pretrain_esft.py: one-line user errors, no traceback, nothing written."""

import json
import os

import pytest

from training_helpers import ECFG, TRAIN, run
from megatron_esft.errors import UserError


def _pretrain(argv):
    from megatron_esft.training.loop import pretrain

    return pretrain(argv)


def _args(env, load, save, *extra):
    return ["--load", load, "--save", save, "--train-data", env["data"], "--train-iters", "2", *TRAIN, *extra]


@pytest.mark.parametrize("experts, message", [
    ({"1": [0], "2": [1], "3": [], "7": [0]}, "layer(s) 7 are not MoE layers"),
    ({"1": [0], "2": [8], "3": []}, "expert id(s) [8] outside 0..7"),
    ({"1": [3, 3], "2": [], "3": []}, "duplicate expert ids"),
    ({"1": [], "2": [], "3": []}, "selects no expert"),
    ({"1": [0]}, "missing MoE layer(s) 2, 3"),
])
def test_bad_expert_config(training_env, tmp_path, experts, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(dict(ECFG, experts=experts)))
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        _pretrain(_args(training_env, training_env["base"], save, "--expert-config", str(cfg)))
    assert not os.path.exists(save)


def test_resume_with_a_different_config_or_mode(training_env, reference, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(ECFG, experts={"1": [1], "2": [5], "3": []})))
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="differs from the expert config inside the checkpoint"):
        _pretrain(_args(training_env, reference["save"], save, "--train-iters", "8", "--expert-config", str(other)))
    with pytest.raises(UserError, match="trained with --finetune-mode esft"):
        _pretrain(_args(training_env, reference["save"], save, "--train-iters", "8", "--finetune-mode", "full"))
    with pytest.raises(UserError, match="nothing left to train"):
        _pretrain(_args(training_env, reference["save"], save, "--train-iters", "6"))
    with pytest.raises(UserError, match="not divisible by tensor x pipeline"):
        _pretrain(_args(training_env, reference["save"], save, "--train-iters", "8",
                        "--tensor-model-parallel-size", "2"))
    assert not os.path.exists(save)


def test_cli_error_is_one_line(training_env, tmp_path):
    cfg = tmp_path / "empty.json"
    cfg.write_text(json.dumps(dict(ECFG, experts={"1": [], "2": [], "3": []})))
    save = str(tmp_path / "out")
    proc = run(["pretrain_esft.py", *_args(training_env, training_env["base"], save, "--expert-config", str(cfg))],
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "selects no expert" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(save)


def test_recompute_modules_need_selective_recompute_and_grouped_experts_for_moe_act(training_env, tmp_path):
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="--recompute-modules needs --recompute-granularity selective"):
        _pretrain(_args(training_env, training_env["base"], save, "--recompute-modules", "moe"))
    with pytest.raises(UserError, match="moe_act needs --experts-impl grouped"):
        _pretrain(_args(training_env, training_env["base"], save, "--recompute-granularity", "selective",
                        "--recompute-modules", "moe_act", "--experts-impl", "sequential"))
    assert not os.path.exists(save)


def test_overlap_flags_need_overlapped_grad_reduce(training_env, tmp_path):
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="--overlap-param-gather needs --overlap-grad-reduce"):
        _pretrain(_args(training_env, training_env["base"], save, "--overlap-param-gather"))
    with pytest.raises(UserError, match="--ddp-bucket-size needs --overlap-grad-reduce"):
        _pretrain(_args(training_env, training_env["base"], save, "--ddp-bucket-size", "1000"))
    with pytest.raises(UserError, match="--ddp-bucket-size 0: must be at least 1"):
        _pretrain(_args(training_env, training_env["base"], save, "--overlap-grad-reduce", "--ddp-bucket-size", "0"))
    assert not os.path.exists(save)


def test_exit_duration_must_be_positive(training_env, tmp_path):
    save = str(tmp_path / "out")
    for minutes in ("0", "-5", "nan"):
        with pytest.raises(UserError, match=f"--exit-duration-in-mins {float(minutes)}: must be positive"):
            _pretrain(_args(training_env, training_env["base"], save, "--exit-duration-in-mins", minutes))
    assert not os.path.exists(save)


def test_save_and_tensorboard_dir_must_not_be_files(training_env, tmp_path):
    """Found before the data is read, not at the first save after training (a FileExistsError traceback)."""
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=rf"^--save {tmp_path / 'file'}: exists and is not a directory$"):
        _pretrain(_args(training_env, training_env["base"], str(tmp_path / "file")))
    with pytest.raises(UserError, match=rf"^--tensorboard-dir {tmp_path / 'file'}: exists and is not a directory$"):
        _pretrain(_args(training_env, training_env["base"], str(tmp_path / "out"), "--tensorboard-dir",
                        str(tmp_path / "file")))
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_uneven_pipeline_flags_need_pipeline_stages(training_env, tmp_path):
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="need --pipeline-model-parallel-size of at least 2"):
        _pretrain(_args(training_env, training_env["base"], save, "--finetune-mode", "full",
                        "--decoder-first-pipeline-num-layers", "1"))
    assert not os.path.exists(save)


def test_megatron_lm_flags_that_are_always_on_are_accepted():
    """A Megatron-LM launch script's --sequence-parallel and --use-distributed-optimizer parse; what they ask for is
    what the trainer always does (sequence parallelism with TP > 1, the distributed optimizer)."""
    from megatron_esft.training.arguments import build_parser

    args = build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "1", "--seq-length", "8",
                                      "--lr", "1e-5", "--sequence-parallel", "--use-distributed-optimizer"])
    assert args.sequence_parallel and args.use_distributed_optimizer


def test_transformer_impl_local_is_accepted_and_transformer_engine_refused(training_env, tmp_path):
    """Megatron-LM scripts pass --transformer-impl; only the local spec is built (models/provider.py)."""
    from megatron_esft.training.arguments import build_parser

    args = build_parser().parse_args(["--load", "x", "--train-data", "y", "--train-iters", "1", "--seq-length", "8",
                                      "--lr", "1e-5", "--transformer-impl", "local"])
    assert args.transformer_impl == "local"
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="--transformer-impl transformer_engine is not supported"):
        _pretrain(_args(training_env, training_env["base"], save, "--transformer-impl", "transformer_engine"))
    assert not os.path.exists(save)


@pytest.mark.parametrize("extra, message", [
    (["--train-data", "1", "a.jsonl", "2"], "a blend needs WEIGHT PATH pairs"),
    (["--train-data", "0", "a.jsonl"], "blend weight 0 of a.jsonl: must be a positive number"),
    (["--valid-data", "1", "v.jsonl"], "--valid-data takes paths only"),
])
def test_bad_blend(training_env, tmp_path, extra, message):
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match=message):
        _pretrain(_args(training_env, training_env["base"], save, "--expert-config", training_env["ecfg"], *extra))
    assert not os.path.exists(save)


def test_trained_weights_only_is_for_esft(training_env, tmp_path):
    save = str(tmp_path / "out")
    with pytest.raises(UserError, match="--save-trained-weights-only is for --finetune-mode esft"):
        _pretrain(_args(training_env, training_env["base"], save, "--finetune-mode", "full",
                        "--save-trained-weights-only"))
    with pytest.raises(UserError, match="expert bias changes without being a trained parameter"):
        _pretrain(_args(training_env, training_env["base"], save, "--expert-config", training_env["ecfg"],
                        "--save-trained-weights-only", "--moe-router-bias-update-rate", "0.001"))
    assert not os.path.exists(save)
