"""Tiny random DeepSeek checkpoints in Hugging Face format, for tests and the demo (no download).

deepseek-v2 / deepseek-v3 are built with transformers' own DeepseekV2/V3ForCausalLM and written with
`save_pretrained` (per-expert safetensors names `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`).
deepseek-moe (DeepSeekMoE 16B) has no class in transformers (it is remote code), so its config.json and safetensors
are written directly with the official parameter names.

Weights are random but not degenerate: norm weights are 1 +/- noise and V3's `e_score_correction_bias` is random, so
a converter that swaps two norms or drops the bias fails the parity tests. The first `first_k_dense_replace` layers
are dense and the rest MoE with shared experts, like the real models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from megatron_esft.atomic import HF_DIRECTORY_SUFFIXES, atomic_directory
from megatron_esft.errors import UserError

ARCHES = ("deepseek-v2", "deepseek-v3", "deepseek-moe")


@dataclasses.dataclass
class TinySpec:
    arch: str = "deepseek-v2"
    layers: int = 3
    hidden: int = 64
    experts: int = 8
    topk: int = 2
    moe_ffn: int = 32
    vocab: int = 512
    heads: int = 4
    intermediate: int = 128
    first_dense: int = 1
    shared_experts: int | None = None  # default: 2 (v2, moe), 1 (v3)
    q_lora_rank: int | None = None  # default: None (v2), 24 (v3)
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_group: int | None = None  # default: 2 groups for v3 (exercises group-limited routing), else 1
    topk_group: int | None = None  # default: 1
    topk_method: str = "greedy"
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float | None = None
    yarn: bool = False
    init_std: float = 0.08
    seed: int = 0
    dtype: str = "float32"
    fp8_block: int | None = None  # write the DeepSeek-V3 release's block-wise FP8 layout with this block size

    def validate(self) -> None:
        if self.arch not in ARCHES:
            raise UserError(f"--arch {self.arch!r} is not one of {', '.join(ARCHES)}")
        for name in ("layers", "hidden", "experts", "topk", "moe_ffn", "vocab", "heads"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.topk > self.experts:
            raise UserError(f"--topk {self.topk} exceeds --experts {self.experts}")
        if self.hidden % self.heads:
            raise UserError(f"--hidden {self.hidden} must be divisible by the {self.heads} attention heads")
        if self.first_dense >= self.layers:
            raise UserError(f"--layers {self.layers} leaves no MoE layer after {self.first_dense} dense layer(s)")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.fp8_block is not None and self.fp8_block <= 0:
            raise UserError(f"--fp8-block must be positive, got {self.fp8_block}")


def hf_config_dict(spec: TinySpec) -> dict:
    v3 = spec.arch == "deepseek-v3"
    shared = spec.shared_experts if spec.shared_experts is not None else (1 if v3 else 2)
    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        moe_intermediate_size=spec.moe_ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        n_routed_experts=spec.experts,
        n_shared_experts=shared,
        num_experts_per_tok=spec.topk,
        first_k_dense_replace=spec.first_dense,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        aux_loss_alpha=0.001,
        seq_aux=True,
        torch_dtype=spec.dtype,
    )
    if spec.arch == "deepseek-moe":
        return dict(
            common,
            model_type="deepseek",
            architectures=["DeepseekForCausalLM"],
            moe_layer_freq=1,
            scoring_func="softmax",
            norm_topk_prob=bool(spec.norm_topk_prob),
            rope_theta=10000.0,
            attention_bias=False,
            hidden_act="silu",
        )
    mla = dict(
        kv_lora_rank=spec.kv_lora_rank,
        q_lora_rank=spec.q_lora_rank if spec.q_lora_rank is not None else (24 if v3 else None),
        qk_nope_head_dim=spec.qk_nope_head_dim,
        qk_rope_head_dim=spec.qk_rope_head_dim,
        v_head_dim=spec.v_head_dim,
        n_group=(spec.n_group or (2 if v3 else 1)) if (v3 or spec.topk_method == "group_limited_greedy") else 1,
        topk_group=(spec.topk_group or 1) if (v3 or spec.topk_method == "group_limited_greedy") else 1,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if spec.yarn:
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        }
    if v3:
        return dict(
            common,
            **mla,
            model_type="deepseek_v3",
            norm_topk_prob=True if spec.norm_topk_prob is None else spec.norm_topk_prob,
            routed_scaling_factor=2.5 if spec.routed_scaling_factor is None else spec.routed_scaling_factor,
            rope_interleave=True,
            rope_parameters=rope,
        )
    return dict(
        common,
        **mla,
        model_type="deepseek_v2",
        topk_method=spec.topk_method,
        norm_topk_prob=bool(spec.norm_topk_prob),
        routed_scaling_factor=1.0 if spec.routed_scaling_factor is None else spec.routed_scaling_factor,
        rope_parameters=rope,
    )


def _perturb_(name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
    noise = torch.randn(tensor.shape, generator=generator)
    if name.endswith("norm.weight") or "layernorm" in name:
        tensor.copy_(1.0 + 0.1 * noise)
    elif name.endswith("e_score_correction_bias"):
        tensor.copy_(0.05 * noise)
    else:
        tensor.copy_(std * noise)


def _random_moe_v1_state(config: dict, spec: TinySpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, heads = spec.hidden, spec.heads
    shapes = {
        "model.embed_tokens.weight": (spec.vocab, h), "model.norm.weight": (h,), "lm_head.weight": (spec.vocab, h)
    }
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
        if layer < spec.first_dense:
            ffn = {"mlp.": spec.intermediate}
        else:
            shapes[p + "mlp.gate.weight"] = (spec.experts, h)
            ffn = {f"mlp.experts.{e}.": spec.moe_ffn for e in range(spec.experts)}
            ffn["mlp.shared_experts."] = spec.moe_ffn * config["n_shared_experts"]
        for prefix, size in ffn.items():
            shapes[p + prefix + "gate_proj.weight"] = (size, h)
            shapes[p + prefix + "up_proj.weight"] = (size, h)
            shapes[p + prefix + "down_proj.weight"] = (h, size)
    del heads
    state = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape)
        _perturb_(name, tensor, generator, spec.init_std)
        state[name] = tensor
    return state


KEPT_IN_FP32 = "e_score_correction_bias"  # transformers' _keep_in_fp32_modules_strict for V3


def make_tiny_deepseek(spec: TinySpec, out_dir: str, tokenizer: bool = True) -> str:
    """Write a tiny random HF checkpoint (config, safetensors, tokenizer) to `out_dir` atomically."""
    spec.validate()
    config = hf_config_dict(spec)
    dtype = getattr(torch, spec.dtype)
    with atomic_directory(out_dir, prefix=".tiny-", replaceable=HF_DIRECTORY_SUFFIXES) as tmp:
        generator = torch.Generator().manual_seed(spec.seed)
        if spec.arch == "deepseek-moe":
            from safetensors.torch import save_file

            state = _random_moe_v1_state(config, spec, generator)
            save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
        else:
            import transformers

            cls_config = transformers.DeepseekV3Config if spec.arch == "deepseek-v3" else transformers.DeepseekV2Config
            cls_model = (
                transformers.DeepseekV3ForCausalLM if spec.arch == "deepseek-v3" else transformers.DeepseekV2ForCausalLM
            )
            hf_config = cls_config(**config)
            torch.manual_seed(spec.seed)
            model = cls_model(hf_config).eval()
            with torch.no_grad():
                for name, param in sorted(model.named_parameters()):
                    _perturb_(name, param.data, generator, spec.init_std)
                biases = {}
                for name, buf in sorted(model.named_buffers()):
                    if name.endswith(KEPT_IN_FP32):
                        _perturb_(name, buf, generator, spec.init_std)
                        biases[name] = buf.float().clone()
                model.to(dtype)
                for name, buf in model.named_buffers():  # stored in fp32 whatever the dtype, as in DeepSeek's releases
                    if name in biases:
                        buf.data = biases[name]
            model.save_pretrained(tmp, safe_serialization=True)
        if spec.fp8_block:
            quantize_like_deepseek_v3(tmp, spec.fp8_block)
        if tokenizer:
            from megatron_esft.data.tiny_tokenizer import build_tiny_tokenizer

            build_tiny_tokenizer(tmp, vocab_size=spec.vocab)
    return out_dir


FP8_QUANTIZED = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")  # the V3 release's FP8 tensors


def deepseek_v3_fp8_config(block: int) -> dict:
    """config.json's `quantization_config` of DeepSeek's block-wise FP8 release (checkpoint/fp8_blocks.py)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]}


def deepseek_v3_fp8_tensors(name: str, tensor: torch.Tensor, fmt) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor as DeepSeek released V3/R1: a decoder Linear weight as e4m3 plus its `_scale_inv` blocks (`fmt`,
    a BlockFp8Format), the router's score-correction bias in fp32, anything else in bf16."""
    from megatron_esft.checkpoint.fp8_blocks import scale_name

    if FP8_QUANTIZED.match(name):
        weight, scale = fmt.quantize(tensor.to(torch.bfloat16))
        return [(name, weight), (scale_name(name), scale)]
    return [(name, tensor.to(torch.float32 if name.endswith(KEPT_IN_FP32) else torch.bfloat16))]


def quantize_like_deepseek_v3(directory: str, block: int) -> None:
    """Rewrite a HF checkpoint the way DeepSeek released V3/R1: every Linear weight of the decoder layers (not the
    router, norms, embeddings or lm_head) as e4m3 with a `_scale_inv` per `block` x `block` block, the router's
    score-correction bias in fp32, the rest in bf16, and config.json's `quantization_config` (checkpoint/fp8_blocks.py)."""
    from safetensors.torch import load_file, save_file

    from megatron_esft.checkpoint.fp8_blocks import BlockFp8Format

    fmt = BlockFp8Format(block=(block, block))
    path = os.path.join(directory, "model.safetensors")
    out = {}
    for name, tensor in load_file(path).items():
        out.update(deepseek_v3_fp8_tensors(name, tensor, fmt))
    save_file(out, path, metadata={"format": "pt"})
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["dtype" if "dtype" in config else "torch_dtype"] = "bfloat16"
    config["quantization_config"] = deepseek_v3_fp8_config(block)
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
