"""examples/slurm: run the real sbatch scripts with bash, fake SLURM_* variables and a fake `scontrol`/`srun` on PATH.

DRY_RUN=1 prints every command; we parse those lines and check launcher geometry, the c10d rendezvous, parallel sizes,
the DESIGN.md command-line contract, stage skipping and resume (--load of the save dir once it has a tracker file).
The last test runs the requeue path for real: USR1 stops the running step and calls `scontrol requeue <job>`.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_DIR = os.path.join(ROOT, "examples", "slurm")
V2_LITE = os.path.join(SLURM_DIR, "esft_deepseek_v2_lite.sbatch")
V3 = os.path.join(SLURM_DIR, "esft_deepseek_v3.sbatch")
TRACKER = "latest_checkpointed_iteration.txt"

FAKE_SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST`: expands the simple form prefix[a-b] used by the tests; logs everything else.
if [ "$1 $2" = "show hostnames" ]; then
    list=$3
    if [[ $list =~ ^([a-z]+)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
        width=${#BASH_REMATCH[2]}
        for ((i = 10#${BASH_REMATCH[2]}; i <= 10#${BASH_REMATCH[3]}; i++)); do printf "%s%0${width}d\\n" "${BASH_REMATCH[1]}" "$i"; done
    else
        echo "$list"
    fi
else
    echo "$*" >> "$FAKE_LOG"
fi
"""

FAKE_SQUEUE = """#!/bin/bash
# `squeue -h -j JOB -o %L`: the job's time left, from $FAKE_TIME_LEFT (no answer when it is unset)
[ -n "$FAKE_TIME_LEFT" ] || exit 1
echo "$FAKE_TIME_LEFT"
"""

FAKE_SRUN = """#!/bin/bash
# a job step that runs until it is stopped; records that it started and how it ended
echo started >> "$FAKE_LOG"
trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 143' TERM
while true; do sleep 0.05; done
"""


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "run"
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "fake.log"),
        "DRY_RUN": "1",
        "HF_MODEL": "/ckpt/model",
        "TRAIN_DATA": "/data/intent.jsonl",
        "WORK_DIR": str(work),
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "64",
    }


def dry_run(script, env, **overrides):
    result = subprocess.run(["bash", script], env={**env, **overrides}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    return commands, result.stderr


def flags(argv):
    """--name value pairs and bare --name flags after the program name."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            name, eq, value = argv[i].partition("=")
            if eq:
                out[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[name] = argv[i + 1]
                i += 1
            else:
                out[name] = True
        i += 1
    return out


def split_launch(command):
    """srun [...] (torchrun [...] | python) SCRIPT [...] -> (srun flags, torchrun flags or None, script, script flags)."""
    assert command[0] == "srun"
    if "torchrun" in command:
        t = command.index("torchrun")
        script_at = next(i for i in range(t + 1, len(command)) if command[i].endswith(".py"))
        return flags(command[1:t]), flags(command[t + 1 : script_at]), command[script_at], flags(command[script_at + 1 :])
    p = command.index("python")
    return flags(command[1:p]), None, command[p + 1], flags(command[p + 2 :])


def by_script(commands):
    return {os.path.basename(split_launch(c)[2]): split_launch(c) for c in commands}


def test_v2_lite_single_node(env):
    commands, _ = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="dgx07")
    steps = by_script(commands)
    assert list(steps) == ["convert_hf_to_mcore.py", "collect_expert_scores.py", "select_experts.py",
                           "pretrain_esft.py", "export_esft.py", "convert_mcore_to_hf.py"]
    srun, torchrun, script, train = steps["pretrain_esft.py"]
    assert (srun["--nodes"], srun["--ntasks"], srun["--ntasks-per-node"]) == ("1", "1", "1")
    assert torchrun == {"--nnodes": "1", "--nproc-per-node": "8", "--rdzv-id": "4242", "--rdzv-backend": "c10d",
                        "--rdzv-endpoint": "dgx07:29500"}
    assert script == os.path.join(ROOT, "pretrain_esft.py")
    work = env["WORK_DIR"]
    assert train == {
        "--load": f"{work}/base_mcore", "--save": f"{work}/checkpoints", "--train-data": "/data/intent.jsonl",
        "--tokenizer": "/ckpt/model", "--expert-config": f"{work}/expert_config.json", "--train-iters": "500",
        "--micro-batch-size": "1", "--global-batch-size": "32", "--seq-length": "4096", "--lr": "1e-5",
        "--weight-decay": "0.1", "--seed": "5934875", "--save-interval": "100", "--log-interval": "10",
        "--tensorboard-dir": f"{work}/tensorboard", "--tensor-model-parallel-size": "1",
        "--expert-model-parallel-size": "8", "--pipeline-model-parallel-size": "1", "--exit-signal-handler": True}
    # the pipeline around training follows DESIGN.md's tool flags
    assert steps["convert_hf_to_mcore.py"][3] == {"--hf": "/ckpt/model", "--out": f"{work}/base_mcore"}
    assert steps["collect_expert_scores.py"][3] == {
        "--load": f"{work}/base_mcore", "--data": "/data/intent.jsonl", "--tokenizer": "/ckpt/model",
        "--out": f"{work}/expert_scores", "--max-tokens": "131072", "--tensor-model-parallel-size": "1",
        "--expert-model-parallel-size": "8", "--pipeline-model-parallel-size": "1"}
    assert steps["select_experts.py"][3] == {"--scores": f"{work}/expert_scores", "--method": "token",
                                             "--top-p": "0.2", "--out": f"{work}/expert_config.json"}
    assert steps["export_esft.py"][3] == {"--load": f"{work}/checkpoints", "--out": f"{work}/adapter"}
    assert steps["convert_mcore_to_hf.py"][3] == {"--load": f"{work}/checkpoints", "--out": f"{work}/hf_merged"}
    for name in ("convert_hf_to_mcore.py", "select_experts.py", "export_esft.py"):
        assert steps[name][0] == {"--nodes": "1", "--ntasks": "1", "--ntasks-per-node": "1"}
    assert not os.path.exists(work), "dry run must not create anything"


def test_v3_multi_node_expert_parallel_across_nodes(env):
    commands, _ = dry_run(V3, env, SLURM_JOB_NUM_NODES="16", SLURM_JOB_NODELIST="gpu[003-018]",
                          SRUN_ARGS="--container-image=nvcr.io#nvidia/pytorch:25.09-py3")
    steps = by_script(commands)
    for name in ("collect_expert_scores.py", "pretrain_esft.py"):
        srun, torchrun, _, args = steps[name]
        assert (srun["--nodes"], srun["--ntasks"], srun["--ntasks-per-node"]) == ("16", "16", "1")
        assert srun["--container-image"] == "nvcr.io#nvidia/pytorch:25.09-py3"
        assert torchrun["--nnodes"] == "16" and torchrun["--nproc-per-node"] == "8"
        assert torchrun["--rdzv-backend"] == "c10d" and torchrun["--rdzv-endpoint"] == "gpu003:29500"
        ep, tp, pp = (int(args[f"--{k}-parallel-size"]) for k in ("expert-model", "tensor-model", "pipeline-model"))
        assert (ep, tp, pp) == (64, 2, 1)
        assert ep > 8, "EP must span nodes (8 GPUs per node)"
    train = steps["pretrain_esft.py"][3]
    world = 16 * 8
    assert int(train["--global-batch-size"]) % (int(train["--micro-batch-size"]) * world // 2) == 0


def test_resume_from_save_dir_when_tracker_exists(env, tmp_path):
    work = tmp_path / "run"
    commands, log = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="dgx07")
    assert by_script(commands)["pretrain_esft.py"][3]["--load"] == f"{work}/base_mcore"
    # a requeued job: base converted, experts selected, training checkpointed at iteration 200
    (work / "base_mcore").mkdir(parents=True)
    (work / "base_mcore" / TRACKER).write_text("0\n")
    (work / "expert_scores").mkdir()
    (work / "expert_scores" / "scores.json").write_text("{}")
    (work / "expert_config.json").write_text("{}")
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / TRACKER).write_text("200\n")
    commands, log = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="dgx07")
    steps = by_script(commands)
    assert list(steps) == ["pretrain_esft.py", "export_esft.py", "convert_mcore_to_hf.py"]
    assert steps["pretrain_esft.py"][3]["--load"] == f"{work}/checkpoints"
    assert steps["pretrain_esft.py"][3]["--save"] == f"{work}/checkpoints"
    assert "stage convert:" in log and "skipping" in log
    # training finished: only the export steps remain
    (work / "checkpoints" / TRACKER).write_text("500\n")
    commands, _ = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="dgx07")
    assert list(by_script(commands)) == ["export_esft.py", "convert_mcore_to_hf.py"]


def test_overrides_and_full_finetune(env):
    commands, _ = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]", STAGES="train",
                          FINETUNE_MODE="full", LR="3e-5", GLOBAL_BATCH_SIZE="64", MASTER_PORT="31000",
                          EXTRA_TRAIN_ARGS="--bf16 --recompute-granularity selective")
    (srun, torchrun, _, train) = split_launch(commands[0])
    assert len(commands) == 1 and srun["--nodes"] == "2" and torchrun["--rdzv-endpoint"] == "n1:31000"
    assert train["--finetune-mode"] == "full" and "--expert-config" not in train
    assert train["--lr"] == "3e-5" and train["--bf16"] is True and train["--recompute-granularity"] == "selective"


def test_weighted_blend_of_training_data(env):
    blend = "1 /data/intent.jsonl 1 /data/alignment.jsonl"
    commands, _ = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="x", TRAIN_DATA=blend,
                          SCORE_DATA="/data/intent.jsonl")
    train = next(c for c in commands if any(a.endswith("pretrain_esft.py") for a in c))
    at = train.index("--train-data")
    assert train[at + 1 : at + 5] == blend.split() and train[at + 5].startswith("--")
    assert by_script(commands)["collect_expert_scores.py"][3]["--data"] == "/data/intent.jsonl"
    # the experts are scored on the task data: a blend without SCORE_DATA does not say which source that is
    result = subprocess.run(["bash", V2_LITE], env={**env, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "x",
                                                    "TRAIN_DATA": blend}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "set SCORE_DATA to the task data" in result.stderr, result.stderr
    assert "+ srun" not in result.stdout
    # with scores from an earlier job (no collect stage) it trains
    commands, _ = dry_run(V2_LITE, env, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="x", TRAIN_DATA=blend,
                          STAGES="train")
    assert len(commands) == 1


@pytest.mark.parametrize("overrides,message", [
    ({"GLOBAL_BATCH_SIZE": "12"}, "not a multiple of MICRO_BATCH_SIZE*DP=8"),
    ({"EP": "16"}, "not divisible by EP*TP*PP=16"),
])
def test_inconsistent_geometry_is_refused(env, overrides, message):
    result = subprocess.run(["bash", V2_LITE], env={**env, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "x",
                                                    **overrides}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr and "+ srun" not in result.stdout


def test_missing_required_setting(env):
    result = subprocess.run(["bash", V2_LITE], env={k: v for k, v in env.items() if k != "HF_MODEL"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "HF_MODEL" in result.stderr


def test_usr1_stops_the_step_and_requeues(env, tmp_path):
    """Not a dry run: the fake srun runs until the USR1 handler TERMs it, then `scontrol requeue 4242` is called."""
    log = tmp_path / "fake.log"
    proc = subprocess.Popen(["bash", V2_LITE], env={**env, "DRY_RUN": "0", "STAGES": "train",
                                                    "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "dgx07"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "started" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert log.read_text().splitlines() == ["started", "srun got TERM", "requeue 4242"]
    assert "requeueing job 4242" in stderr


def test_flags_are_accepted_by_the_tools_that_exist(env):
    """Every flag a script passes appears in that tool's own --help (tools still being built are checked once they
    exist; the conversion and selection tools must already be among the checked ones)."""
    commands, _ = dry_run(V3, env, SLURM_JOB_NUM_NODES="16", SLURM_JOB_NODELIST="gpu[001-016]",
                          EXIT_DURATION_MINS="230")
    assert by_script(commands)["pretrain_esft.py"][3]["--exit-duration-in-mins"] == "230"
    checked = []
    for command in commands:
        _, _, script, args = split_launch(command)
        if not os.path.exists(script):
            continue
        result = subprocess.run([sys.executable, script, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        unknown = [flag for flag in args if flag not in result.stdout]
        assert unknown == [], f"{os.path.basename(script)} does not accept {unknown}"
        checked.append(os.path.basename(script))
    assert {"convert_hf_to_mcore.py", "select_experts.py", "convert_mcore_to_hf.py"} <= set(checked)


def test_uneven_pipeline_stages_reach_scoring_and_training(env):
    """PP_FIRST_LAYERS / PP_LAST_LAYERS become Megatron-LM's uneven-split flags of the two tools that build the model
    per pipeline stage, and both tools accept them."""
    commands, _ = dry_run(V3, env, SLURM_JOB_NUM_NODES="16", SLURM_JOB_NODELIST="gpu[001-016]", PP="4", EP="16",
                          PP_FIRST_LAYERS="13")
    steps = by_script(commands)
    for name in ("collect_expert_scores.py", "pretrain_esft.py"):
        args = steps[name][3]
        assert args["--pipeline-model-parallel-size"] == "4" and args["--decoder-first-pipeline-num-layers"] == "13"
        assert "--decoder-last-pipeline-num-layers" not in args
        help_text = subprocess.run([sys.executable, steps[name][2], "--help"], capture_output=True, text=True,
                                   timeout=60).stdout
        assert "--decoder-first-pipeline-num-layers" in help_text


# a training step that saved a checkpoint at iteration $SAVED_AT and exited 0 (as --exit-duration-in-mins does)
FAKE_SRUN_SAVES = """#!/bin/bash
echo "started $*" >> "$FAKE_LOG"
if [ -n "$SAVED_AT" ]; then mkdir -p "$WORK_DIR/checkpoints"; echo "$SAVED_AT" > "$WORK_DIR/checkpoints/%s"; fi
exit 0
""" % TRACKER


@pytest.mark.parametrize("saved_at, rc, fake_log, message", [
    ("200", 0, ["requeue 4242"], "stopped at iteration 200 of 500; requeueing job 4242"),
    ("", 2, [], "training exited at iteration 0 of 500 without saving a new checkpoint"),
    ("500", 0, ["export_esft.py"], "done"),
])
def test_training_that_stops_early_requeues_instead_of_exporting(env, tmp_path, saved_at, rc, fake_log, message):
    """Not a dry run: after a training step that exits 0 before TRAIN_ITERS, the job is requeued (or, with no new
    checkpoint, stops with an error) and the export stages do not run; a finished one goes on to the export."""
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN_SAVES)
    result = subprocess.run(["bash", V2_LITE], env={**env, "DRY_RUN": "0", "STAGES": "train export",
                                                    "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "dgx07",
                                                    "SAVED_AT": saved_at},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == rc, result.stderr
    assert message in result.stderr
    lines = (tmp_path / "fake.log").read_text().splitlines()
    assert "pretrain_esft.py" in lines[0] and "--exit-signal-handler" in lines[0]
    after = lines[1:]  # what ran after training: each expected piece in its own line, nothing else
    assert len(after) == len(fake_log) and all(piece in line for piece, line in zip(fake_log, after)), lines


@pytest.mark.parametrize("script, overrides, minutes", [
    (V2_LITE, {"FAKE_TIME_LEFT": "03:59:30"}, "219"),        # auto: 239 min left - EXIT_MARGIN_MINS 20
    (V2_LITE, {"FAKE_TIME_LEFT": "1-02:03:04"}, "1543"),     # days-hours:minutes:seconds
    (V2_LITE, {"FAKE_TIME_LEFT": "45:10"}, "25"),            # minutes:seconds
    (V3, {"FAKE_TIME_LEFT": "12:00:00"}, "690"),             # V3's margin is 30 min
    (V2_LITE, {"FAKE_TIME_LEFT": "2:00:00", "EXIT_MARGIN_MINS": "60"}, "60"),
    (V2_LITE, {"FAKE_TIME_LEFT": "03:59:30", "EXIT_DURATION_MINS": "100"}, "100"),
    (V2_LITE, {"FAKE_TIME_LEFT": "03:59:30", "EXIT_DURATION_MINS": ""}, None),  # turned off
    (V2_LITE, {"FAKE_TIME_LEFT": "UNLIMITED"}, None),
    (V2_LITE, {"FAKE_TIME_LEFT": "00:19:59"}, None),        # not more than the margin left
    (V2_LITE, {}, None),                                      # squeue gives no answer
])
def test_exit_duration_follows_the_jobs_time_left(env, script, overrides, minutes):
    nodes = {"SLURM_JOB_NUM_NODES": "16", "SLURM_JOB_NODELIST": "gpu[001-016]"} if script == V3 else \
        {"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "dgx07"}
    commands, log = dry_run(script, env, STAGES="train", **nodes, **overrides)
    train = split_launch(commands[0])[3]
    assert train.get("--exit-duration-in-mins") == minutes
    if minutes is None and overrides.get("EXIT_DURATION_MINS") != "":
        assert "EXIT_DURATION_MINS=auto: no time limit known" in log
