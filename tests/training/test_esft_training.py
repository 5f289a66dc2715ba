"""Single-rank ESFT training end to end: freezing (bit-identical outside the selected experts, in HF space), exact
resume, grouped vs sequential experts, Megatron log lines and TensorBoard."""

import glob
import math
import os
import re
from pathlib import Path

import torch

from training_helpers import load_hf, load_mcore, losses, pretrain, selected_name, to_hf


def test_only_selected_experts_change_with_weight_decay(training_env, reference):
    base = load_hf(training_env["hf"])
    trained = reference["hf6"]
    assert set(trained) == set(base)
    changed = sorted(n for n in base if not torch.equal(base[n], trained[n]))
    # every tensor outside the selected experts is bit-identical (weight decay 0.1 must not touch frozen ones) ...
    assert all(selected_name(n) for n in changed), changed
    # ... and every selected expert's three projections moved
    selected = sorted(n for n in base if selected_name(n))
    assert len(selected) == 9 and changed == selected


def test_log_lines_trainable_params_and_tensorboard(training_env, reference):
    out = reference["proc"].stdout
    lines = [line for line in out.splitlines() if line.startswith(" iteration ")]
    assert len(lines) == 6
    pattern = (r" iteration +(\d+)/ +6 \| consumed samples: +(\d+) \| elapsed time per iteration \(ms\): [0-9.]+ \| "
               r"throughput per GPU \(TFLOP/s/GPU\): [0-9.]+ \| learning rate: 1\.000000E-03 \| "
               r"global batch size: +4 \| lm loss: [0-9.E+-]+ \| "
               r"grad norm: [0-9.]+ \| num zeros: \d+\.0 \| params norm: \d+\.\d{3} \| "
               r"trainable params: (\d+) \| tokens/s: [0-9.]+")
    for i, line in enumerate(lines, 1):
        m = re.fullmatch(pattern, line)
        assert m, line
        assert int(m.group(1)) == i and int(m.group(2)) == 4 * i
        assert int(m.group(3)) == 3 * 3 * 64 * 32  # 3 experts x (gate, up, down) x hidden 64 x moe_ffn 32
    assert "layer 1: 12,288" in out and "layer 2: 6,144" in out and "layer 0: 0" in out and "layer 3: 0" in out
    events = glob.glob(os.path.join(str(training_env["root"] / "tb"), "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(events[0], size_guidance={"tensors": 0, "scalars": 0}).Reload()
    table = tb.Tensors("trainable-params/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| layer 1 | 12,288 |" in table and "**total** | **18,432 of" in table
    # the share of routed tokens reaching the trained experts, per MoE layer, at every log line
    shares = [e.value for e in tb.Scalars("expert-load/selected-share/layer_1")]
    assert len(shares) == 6 and all(0.0 < v < 1.0 for v in shares)
    # validation before training (the base model: reference routing, drift 0) and every --eval-interval
    vals = re.findall(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+) \| "
                      r"lm loss PPL: ([0-9.E+-]+) \| expert-load drift \(max over layers\): ([0-9.]+)", out)
    assert [int(v[0]) for v in vals] == [0, 3, 6] and float(vals[0][3]) == 0.0
    for _, loss, ppl, _ in vals:  # Megatron-LM's perplexity, also in TensorBoard
        assert abs(float(ppl) - math.exp(float(loss))) <= 1e-5 * float(ppl)
    ppls = [e.value for e in tb.Scalars("lm loss validation ppl")]
    assert len(ppls) == 3 and abs(ppls[-1] - math.exp(float(vals[-1][1]))) <= 1e-5 * ppls[-1]
    best = min(vals[1:], key=lambda v: float(v[1]))
    from megatron_esft.checkpoint.mcore_checkpoint import read_meta, read_tracker

    best_dir = os.path.join(reference["save"], "best")
    assert read_tracker(best_dir) == int(best[0])
    assert abs(read_meta(best_dir)["train_state"]["best_validation_loss"] - float(best[1])) <= 1e-6 * float(best[1])
    assert float(best[1]) < float(vals[0][1])  # training the selected experts lowers the validation loss


def test_resume_is_bit_identical(training_env, reference):
    """6 iterations straight == 3 iterations + resume for 3 (model, optimizer, data position, schedule, RNG)."""
    save = str(training_env["root"] / "resume")
    first = pretrain(training_env["base"], save, "--expert-config", training_env["ecfg"], "--train-iters", "6",
                     "--exit-interval", "3", "--eval-interval", "3", data=training_env["data"])
    # the expert config travels in the checkpoint
    second = pretrain(save, save, "--train-iters", "6", "--eval-interval", "3", data=training_env["data"])
    assert "resumed from" in second.stdout
    assert losses(first) + losses(second) == reference["losses"]
    straight, resumed = load_mcore(reference["save"], 6), load_mcore(save, 6)
    assert set(straight) == set(resumed)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_grouped_and_sequential_experts_train_alike(training_env, reference):
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--experts-impl", "sequential", data=training_env["data"])
    seq = losses(proc)
    assert len(seq) == 3
    for a, b in zip(seq, reference["losses"][:3]):
        assert abs(a - b) <= 1e-6 * abs(b), (seq, reference["losses"][:3])


def test_device_token_counts_train_alike(training_env, reference):
    """--moe-token-counts device (experts/device_counts.py): the same training bit for bit on the CPU (the same
    per-expert GEMMs), the same checkpoint (its frozen experts' Parameters are views into a stacked weight that also
    holds the trained experts: only their own values are written, not the whole stack), and the log line says so."""
    save = str(training_env["root"] / "device_counts")
    proc = pretrain(training_env["base"], save, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--save-interval", "3", "--eval-interval", "3", "--moe-token-counts", "device",
                    data=training_env["data"])
    assert losses(proc) == reference["losses"][:3]
    ours, want = load_mcore(save, 3), load_mcore(reference["save"], 3)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    sizes = [sum(f.stat().st_size for f in Path(d, "iter_0000003").iterdir()) for d in (save, reference["save"])]
    assert sizes[0] <= 1.05 * sizes[1], sizes
    assert "MoE token permutation: experts (token counts on the device: no host sync)" in proc.stdout
    extra = re.search(r"the trained experts' weights are held twice, ([0-9.]+) MiB more on this rank", proc.stdout)
    assert extra and float(extra.group(1)) > 0


def test_selective_recompute_trains_alike(training_env, reference):
    """Megatron-LM's selective recompute flags, every module that applies to this model at once: the same training
    (fp32; a recompute sums some gradients in another order). "moe" recomputes the MoE layers in a reentrant
    checkpoint, which trains the first MoE layer's experts only through the hang guard."""
    proc = pretrain(training_env["base"], None, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe_act",
                    "layernorm", "mla_up_proj", "moe", data=training_env["data"])
    got = losses(proc)
    assert len(got) == 3
    for a, b in zip(got, reference["losses"][:3]):
        assert abs(a - b) <= 1e-5 * abs(b), (got, reference["losses"][:3])


def test_full_finetuning_trains_everything(training_env):
    """--finetune-mode full (the FFT baseline) runs the same loop with every parameter trainable."""
    save = str(training_env["root"] / "full")
    proc = pretrain(training_env["base"], save, "--finetune-mode", "full", "--train-iters", "1",
                    data=training_env["data"])
    total = int(re.search(r"trainable params: (\d+)", proc.stdout).group(1))
    assert f"trainable parameters: {total:,} of {total:,} (100.00%)" in proc.stdout
    base, trained = load_mcore(training_env["base"], 0), load_mcore(save, 1)
    assert set(base) == set(trained) and len(base) > 20
    unchanged = [n for n in base if torch.equal(base[n], trained[n])]
    assert not unchanged, unchanged
    experts = base["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]
    moved = trained["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]
    assert all(not torch.equal(experts[e], moved[e]) for e in range(experts.shape[0]))  # every expert, even unrouted
