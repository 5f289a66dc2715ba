"""GPU switches of pretrain_esft.py: --no-bias-swiglu-fusion / --no-rope-fusion (Megatron-LM's) and
--no-linear-cross-entropy-fusion pick the fused kernels,
--flex-attention is opt-in, --expert-fp8-weight-cache, --expert-fp8-gemm-kernel, --expert-fp8-quantizer and
--offload-frozen-experts need FP8 experts."""

import pytest
import torch

from megatron_esft.models.hf_config import parse_hf_config
from megatron_esft.models.tiny import TinySpec, hf_config_dict
from megatron_esft.training.arguments import build_parser
from megatron_esft.training.setup import training_fusions

REQUIRED = ["--load", "x", "--save", "y", "--train-data", "d.jsonl", "--train-iters", "1", "--micro-batch-size", "1",
            "--seq-length", "8", "--lr", "1e-4"]


def _fusions(*flags):
    args = build_parser().parse_args(REQUIRED + list(flags))
    return training_fusions(args, parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2", yarn=True))))


def test_cpu_runs_stay_eager():
    if not torch.cuda.is_available():
        assert _fusions() == ()


def test_flags_turn_fusions_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what "auto" would pick on a GPU machine
    assert _fusions() == ("swiglu", "rope", "linear_cross_entropy")  # Triton is installed with the test extras
    assert _fusions("--no-rope-fusion") == ("swiglu", "linear_cross_entropy")
    assert _fusions("--no-bias-swiglu-fusion") == ("rope", "linear_cross_entropy")
    assert _fusions("--no-linear-cross-entropy-fusion") == ("swiglu", "rope")
    assert _fusions("--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-linear-cross-entropy-fusion") == ()


def test_fp8_weight_cache_flag_needs_fp8_experts():
    from megatron_esft.errors import UserError
    from megatron_esft.training.arguments import validate

    args = build_parser().parse_args(REQUIRED + ["--expert-fp8-weight-cache", "none"])
    assert args.expert_fp8_weight_cache == "none"
    with pytest.raises(UserError, match="--expert-fp8-weight-cache needs --expert-gemm fp8"):
        validate(args, world_size=1)
    validate(build_parser().parse_args(REQUIRED), world_size=1)  # the default is accepted everywhere


def test_the_fp8_gemm_kernel_flag_needs_fp8_experts_and_triton(monkeypatch):
    from megatron_esft.errors import UserError
    from megatron_esft.experts import triton_support
    from megatron_esft.training.arguments import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the FP8 checks need a Hopper GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(UserError, match="--expert-fp8-gemm-kernel needs --expert-gemm fp8"):
        validate(build_parser().parse_args(REQUIRED + ["--expert-fp8-gemm-kernel", "triton"]), world_size=1)
    fp8_triton = REQUIRED + ["--expert-gemm", "fp8", "--expert-fp8-gemm-kernel", "triton"]
    assert validate(build_parser().parse_args(fp8_triton), world_size=1).expert_fp8_gemm_kernel == "triton"
    # a pinned candidate: only for the Triton kernel, and only one of its candidates
    pinned = validate(build_parser().parse_args(fp8_triton + ["--expert-fp8-gemm-config", "TMA 64x128x128 w4 s4"]),
                      world_size=1)
    assert pinned.expert_fp8_gemm_config == "TMA 64x128x128 w4 s4"
    with pytest.raises(UserError, match="--expert-fp8-gemm-config needs --expert-fp8-gemm-kernel triton"):
        validate(build_parser().parse_args(REQUIRED + ["--expert-gemm", "fp8", "--expert-fp8-gemm-config",
                                                       "TMA 64x128x128 w4 s4"]), world_size=1)
    with pytest.raises(UserError, match=r"--expert-fp8-gemm-config 'TMA 64x128x128': not a candidate of the Triton "
                                        r"FP8 GEMM; choose from 'pointer 128x128x128 w8 s3', "):
        validate(build_parser().parse_args(fp8_triton + ["--expert-fp8-gemm-config", "TMA 64x128x128"]),
                 world_size=1)
    monkeypatch.setattr(triton_support, "triton_importable", lambda: False)
    with pytest.raises(UserError, match="--expert-fp8-gemm-kernel triton needs Triton"):
        validate(build_parser().parse_args(fp8_triton), world_size=1)
    assert build_parser().parse_args(REQUIRED).expert_fp8_gemm_kernel == "torch"


def test_the_fp8_quantizer_flag_needs_fp8_experts_and_triton(monkeypatch):
    from megatron_esft.errors import UserError
    from megatron_esft.experts import triton_support
    from megatron_esft.training.arguments import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the FP8 checks need a Hopper GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert build_parser().parse_args(REQUIRED).expert_fp8_quantizer == "inductor"
    with pytest.raises(UserError, match="--expert-fp8-quantizer needs --expert-gemm fp8"):
        validate(build_parser().parse_args(REQUIRED + ["--expert-fp8-quantizer", "triton"]), world_size=1)
    fp8_triton = REQUIRED + ["--expert-gemm", "fp8", "--expert-fp8-quantizer", "triton"]
    assert validate(build_parser().parse_args(fp8_triton), world_size=1).expert_fp8_quantizer == "triton"
    monkeypatch.setattr(triton_support, "triton_importable", lambda: False)
    with pytest.raises(UserError, match="--expert-fp8-quantizer triton needs Triton"):
        validate(build_parser().parse_args(fp8_triton), world_size=1)
    with pytest.raises(UserError, match="--expert-fp8-quantizer: invalid choice: 'cuda'"):
        build_parser().parse_args(REQUIRED + ["--expert-fp8-quantizer", "cuda"])


def test_device_token_counts_need_grouped_experts_that_permute_at_ep1(monkeypatch):
    from megatron_esft.errors import UserError
    from megatron_esft.training.arguments import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the FP8 checks that follow need a Hopper GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for flags in ([], ["--expert-gemm", "fp8"], ["--expert-gemm", "fp8", "--expert-fp8-weight-cache", "all"]):
        validate(build_parser().parse_args(REQUIRED + flags + ["--moe-token-counts", "device"]), world_size=1)
    for flags in (["--experts-impl", "sequential"], ["--expert-gemm", "fp8", "--expert-fp8-weight-cache", "none"],
                  ["--moe-permutation", "gather"], ["--expert-model-parallel-size", "2"]):
        args = build_parser().parse_args(REQUIRED + flags + ["--moe-token-counts", "device"])
        with pytest.raises(UserError, match="--moe-token-counts device needs --experts-impl grouped, --moe-permutation "
                                            "experts, --expert-model-parallel-size 1 and, with --expert-gemm fp8, "
                                            "--expert-fp8-weight-cache frozen or all"):
            validate(args, world_size=2)


def test_fp8_experts_need_the_gpus_with_row_wise_scaled_grouped_kernels(monkeypatch):
    """torch._scaled_grouped_mm has row-wise FP8 kernels for compute capability 9.0 and 10.0 only (not e.g. 12.0)."""
    from megatron_esft.errors import UserError
    from megatron_esft.training.arguments import validate

    def args():
        return build_parser().parse_args(REQUIRED + ["--expert-gemm", "fp8"])

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--expert-gemm fp8 needs a GPU of compute capability 9.0 or 10.0"):
            validate(args(), world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, accepted in [((9, 0), True), ((10, 0), True), ((8, 0), False), ((12, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        if accepted:
            assert validate(args(), world_size=1).expert_gemm == "fp8"
        else:
            with pytest.raises(UserError, match=r"--expert-gemm fp8 needs a GPU of compute capability 9.0 or 10.0 "):
                validate(args(), world_size=1)


def test_offload_frozen_experts_needs_fp8_experts_with_a_weight_cache(monkeypatch):
    from megatron_esft.errors import UserError
    from megatron_esft.training.arguments import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the FP8 checks that follow need a Hopper GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for flags in ([], ["--expert-gemm", "fp8", "--expert-fp8-weight-cache", "none"]):
        args = build_parser().parse_args(REQUIRED + flags + ["--offload-frozen-experts"])
        with pytest.raises(UserError, match="--offload-frozen-experts needs --expert-gemm fp8 with "
                                            "--expert-fp8-weight-cache frozen or all"):
            validate(args, world_size=1)
    for cache in ("frozen", "all"):
        args = build_parser().parse_args(REQUIRED + ["--expert-gemm", "fp8", "--expert-fp8-weight-cache", cache,
                                                     "--offload-frozen-experts"])
        assert validate(args, world_size=1).offload_frozen_experts


def test_flex_attention_is_opt_in_and_needs_a_gpu(monkeypatch):
    from megatron_esft.errors import UserError
    from megatron_esft.training.arguments import validate

    args = build_parser().parse_args(REQUIRED + ["--flex-attention"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--flex-attention needs a GPU"):
            validate(args, world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _fusions("--flex-attention") == ("swiglu", "rope", "linear_cross_entropy", "flex_attention")
    assert "flex_attention" not in _fusions()


def test_moe_permutation_flag_reaches_the_model():
    """--moe-permutation picks the dispatcher's permutation of every MoE layer; the trainer logs it."""
    from megatron_esft.models.fusions import describe
    from megatron_esft.parallel import ParallelConfig, initialize
    from megatron_esft.training.setup import build_trainable_model

    initialize(ParallelConfig(), seed=1)
    cfg = parse_hf_config(hf_config_dict(TinySpec(arch="deepseek-v2")))
    for flags, expected in (([], "experts"), (["--moe-permutation", "gather"], "gather"),
                            (["--moe-permutation", "megatron"], "megatron")):
        args = build_parser().parse_args(REQUIRED + flags)
        model = build_trainable_model(args, cfg, ParallelConfig())
        permutations = {layer.mlp.token_dispatcher.permutation for layer in model.decoder.layers
                        if hasattr(layer.mlp, "token_dispatcher")}
        assert permutations == {expected}
        assert describe(model).endswith(f"MoE token permutation: {expected}")
    from megatron_esft.errors import UserError

    with pytest.raises(UserError, match="--moe-permutation: invalid choice: 'fast'"):
        build_parser().parse_args(REQUIRED + ["--moe-permutation", "fast"])
