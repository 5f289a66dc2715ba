"""ExpertLoadTracker (training/expert_load.py): per-layer routed-token counts of real tokens only, kept on the routers'
device until `reduce()`."""

import pytest
import torch

from megatron_esft.training.expert_load import ExpertLoadTracker


def test_counts_real_tokens_per_layer_and_expert():
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                  vocab=64)))
    model = build_model(cfg, experts="grouped").eval()  # evaluation: no_grad forwards count (training: recompute)
    tracker = ExpertLoadTracker(model, cfg.num_layers, cfg.n_routed_experts)
    seen = {}  # the routers' own routing maps, [s*b, E] sequence-major
    for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
        router.register_forward_hook(lambda r, a, out: seen.setdefault(r.layer_number - 1, []).append(out[1].clone()))
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False  # padding at the end of the second sequence
    want = torch.zeros(cfg.num_layers, cfg.n_routed_experts, dtype=torch.float64)
    with torch.no_grad():
        for step in range(2):
            tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            tracker.set_valid_mask(valid)
            model(tokens, torch.arange(16).expand(2, 16), None)
    for layer, maps in seen.items():
        for routing_map in maps:
            want[layer] += routing_map[valid.t().reshape(-1)].sum(0).double()
    assert sorted(seen) == [1, 2] and want.sum() == 2 * 2 * 26 * cfg.num_experts_per_tok
    total = tracker.reduce()
    assert total.dtype == torch.float64 and total.device.type == "cpu" and torch.equal(total, want)
    assert torch.equal(tracker.reduce(), torch.zeros_like(want))  # reduce resets the table




def test_evaluation_counts_in_a_table_of_its_own():
    """An evaluation inside a logging window (separate_table, what the trainer's evaluate uses): its reduce sees
    the evaluation's tokens only, and the training counts of the window are still there afterwards."""
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                  vocab=64)))
    model = build_model(cfg, experts="grouped").eval()
    tracker = ExpertLoadTracker(model, cfg.num_layers, cfg.n_routed_experts)
    train, valid = (torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1))

    def forward(tokens):
        with torch.no_grad():
            model(tokens, torch.arange(16).expand(2, 16), None)

    forward(train)
    train_counts = tracker.reduce()
    forward(valid)
    valid_counts = tracker.reduce()
    assert not torch.equal(train_counts, valid_counts)
    forward(train)  # a training step of the window, not yet logged
    with tracker.separate_table():
        forward(valid)
        assert torch.equal(tracker.reduce(), valid_counts)
    assert torch.equal(tracker.reduce(), train_counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronizations exist on CUDA only")
def test_cuda_hook_runs_without_host_syncs():
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model
    from megatron_esft.models.tiny import TinySpec, hf_config_dict
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1)
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", layers=3, hidden=32, experts=8, moe_ffn=16,
                                                  vocab=64)))
    model = build_model(cfg, experts="grouped").eval()
    tracker = ExpertLoadTracker(model, cfg.num_layers, cfg.n_routed_experts)
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    routing_map = torch.zeros(32, 8, dtype=torch.bool, device="cuda")
    routing_map[:, :2] = True
    valid = torch.ones(2, 16, dtype=torch.bool, device="cuda")
    valid[0, 8:] = False
    tracker.set_valid_mask(valid)
    tracker._hook(router, None, (None, routing_map))  # first call allocates the table
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            tracker._hook(router, None, (None, routing_map))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tracker.reduce()[router.layer_number - 1].tolist() == [48.0, 48.0] + [0.0] * 6
