"""Useful FLOPs of an iteration (training/flops.py), counted from the HF config, against an independent count from
the built Megatron-Core model: the numel of its weight matrices and which of them require grad after
`apply_finetune_mode` (the trainer's own freezing), for V2 (MLA), V3 (MLA with q-LoRA) and DeepSeekMoE (standard
attention), with ESFT (experts only, plus shared experts, plus non-expert modules) and full fine-tuning."""

from pathlib import Path

import pytest
import torch

from megatron_esft.esft.expert_config import ExpertConfig
from megatron_esft.training.flops import TrainedWeights, attended_pairs, iteration_flops

EXPERTS = {"1": [0, 2], "2": [5], "3": []}


@pytest.fixture(scope="module")
def mcore():
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield


def _model(arch):
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    cfg = parse_hf_config(hf_config_dict(TinySpec(arch=arch, layers=4, hidden=48, experts=8, moe_ffn=16, vocab=64)))
    return cfg, build_model(cfg, experts="grouped")


def _reference(model, cfg, tokens, pairs, routed_rows, trained_rows):
    """Walk the model: forward over every weight matrix; input gradients above the lowest decoder layer with a
    trainable weight (every layer when the embedding trains) and, inside it, the fc2 inputs of what trains there;
    weight gradients of the matrices that require grad (routed experts: by their trained rows)."""
    from megatron_esft.esft.freeze import decoder_layers, is_moe_layer

    h = cfg.hidden_size
    per_expert, fc2 = 3 * h * cfg.moe_intermediate_size, h * cfg.moe_intermediate_size
    heads = cfg.num_attention_heads
    if cfg.multi_latent_attention:
        dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        dims = 2 * (h // heads)
    core = 2 * heads * dims * pairs
    layers = sorted(decoder_layers([model]), key=lambda t: t[0])
    if model.embedding.word_embeddings.weight.requires_grad:
        lowest = 0
    else:
        lowest = min(n for n, layer in layers if any(p.requires_grad for p in layer.parameters()))
    fwd = dgrad = wgrad = 0.0
    for number, layer in layers:
        matrices = [(name, p) for name, p in layer.named_parameters() if p.dim() >= 2 and ".experts." not in
                    f".{name}".replace(".shared_experts.", ".shared.")]
        dense = sum(p.numel() for _, p in matrices)
        routed = routed_rows.get(number - 1, 0)
        trained = trained_rows.get(number - 1, 0)
        f_layer = 2 * dense * tokens + core + 2 * per_expert * routed
        fwd += f_layer
        if number > lowest:
            dgrad += f_layer + core
        elif number == lowest:
            shared_fc2 = sum(p.numel() for name, p in matrices
                             if "shared_experts.linear_fc2" in name and p.requires_grad)
            dgrad += 2 * fc2 * trained + 2 * shared_fc2 * tokens
        wgrad += 2 * tokens * sum(p.numel() for _, p in matrices if p.requires_grad)
        if is_moe_layer(layer) and layer.mlp.experts.trainable_local_experts:
            wgrad += 2 * per_expert * trained
    output = model.output_layer.weight
    out = 2 * output.numel() * tokens
    return fwd + dgrad + wgrad + 2 * out + (out if output.requires_grad else 0)


@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v3", "deepseek-moe"])
@pytest.mark.parametrize("mode", ["experts", "shared", "non_expert", "full"])
def test_flops_from_the_config_equal_a_count_over_the_model(mcore, arch, mode):
    from megatron_esft.esft.freeze import apply_finetune_mode

    cfg, model = _model(arch)
    ecfg = None if mode == "full" else ExpertConfig(dict(EXPERTS), shared_experts=mode == "shared",
                                                    non_expert_modules=mode == "non_expert")
    apply_finetune_mode([model], "full" if mode == "full" else "esft", ecfg)
    tokens, pairs = 3 * 64, 3 * 64 * 65 // 2
    routed = {layer: tokens * cfg.num_experts_per_tok for layer in cfg.moe_layers}
    trained = {1: 70, 2: 31, 3: 0} if mode != "full" else routed
    want = _reference(model, cfg, tokens, pairs, routed, trained)
    got = iteration_flops(cfg, TrainedWeights.from_expert_config(ecfg), tokens=tokens, pairs=pairs,
                          trained_rows=trained)
    assert got == pytest.approx(want, rel=1e-12)
    if mode == "experts":  # ESFT counts far less than full fine-tuning: no wgrad of frozen weights, no dgrad below
        full = iteration_flops(cfg, TrainedWeights(), tokens=tokens, pairs=pairs)
        assert got < 0.8 * full


def test_trained_rows_default_to_the_selected_share():
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.tiny import TinySpec, hf_config_dict

    cfg = parse_hf_config(hf_config_dict(TinySpec(layers=4, experts=8, topk=2)))
    trained = TrainedWeights({1: [0, 2], 2: [5], 3: []})
    rows = {1: 100 * 2 * 2 / 8, 2: 100 * 2 / 8}
    assert iteration_flops(cfg, trained, tokens=100, pairs=5050) == \
        iteration_flops(cfg, trained, tokens=100, pairs=5050, trained_rows=rows)


def test_attended_pairs_are_causal_per_document_without_padding():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [4, 4, 4, 4, 4, 4]])
    assert attended_pairs(ids) == (6 + 3) + 21


def test_trainer_throughput_is_the_iterations_useful_flops_per_second(training_env, reference):
    """--log-throughput (the reference run): TensorBoard's `throughput` of every iteration equals this file's FLOP
    count of that iteration's tokens (global batch x sequence), its batches' attended pairs and the logged share
    of routed tokens that reached the selected experts, divided by the logged iteration time."""
    import glob
    import json
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training_helpers import ECFG, TRAIN
    from megatron_esft.data import SFTDataLoader
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.training.arguments import build_parser, validate
    from megatron_esft.training.loop import build_data

    events = glob.glob(os.path.join(str(training_env["root"] / "tb"), "events.out.tfevents.*"))
    tb = EventAccumulator(events[0], size_guidance={"scalars": 0}).Reload()
    throughput = {e.step: e.value for e in tb.Scalars("throughput")}
    seconds = {e.step: e.value for e in tb.Scalars("iteration-time")}
    shares = {layer: {e.step: e.value for e in tb.Scalars(f"expert-load/selected-share/layer_{layer}")}
              for layer in (1, 2)}
    assert sorted(throughput) == list(range(1, 7))
    cfg = parse_hf_config(json.loads((Path(training_env["hf"]) / "config.json").read_text()))
    args = validate(build_parser().parse_args(["--load", training_env["base"], "--train-data", training_env["data"],
                                               "--train-iters", "6", *TRAIN]), world_size=1)
    loader = SFTDataLoader(build_data(args)[0], args.micro_batch_size)
    tokens = args.global_batch_size * args.seq_length
    trained = TrainedWeights({int(k): v for k, v in ECFG["experts"].items()})
    for step in range(1, 7):
        pairs = sum(attended_pairs(next(loader)["document_ids"]) for _ in range(args.num_micro_batches))
        rows = {layer: shares[layer][step] * tokens * cfg.num_experts_per_tok for layer in (1, 2)}
        flops = iteration_flops(cfg, trained, tokens=tokens, pairs=pairs, trained_rows=rows)
        assert throughput[step] == pytest.approx(flops / seconds[step] / 1e12, rel=1e-4), step
