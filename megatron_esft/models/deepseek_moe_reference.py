"""An independent float64 reference forward for DeepSeekMoE 16B (`model_type: deepseek`).

transformers ships no class for this architecture (it is remote code), so parity is checked against this direct
transcription of the published model: Llama-style multi-head attention with rotate-half RoPE, RMSNorm, SwiGLU MLPs,
and a MoE block = shared experts + sum over the top-k routed experts of softmax-gate * expert(x), the gate being a
softmax over all experts' logits (no renormalization unless `norm_topk_prob`). It reads the HF safetensors directly
and shares no code with the Megatron-Core path.
"""

from __future__ import annotations

import torch

from megatron_esft.models.hf_config import DeepSeekConfig


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x, weights, prefix):
    gate = x @ weights[prefix + "gate_proj.weight"].T
    up = x @ weights[prefix + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ weights[prefix + "down_proj.weight"].T


def _rope(x, positions, theta):
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions[:, None].double() * inv[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@torch.no_grad()
def forward(cfg: DeepSeekConfig, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, s] -> logits [b, s, vocab] in float64."""
    w = {k: v.double() for k, v in weights.items()}
    b, s = tokens.shape
    h, heads, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    kv_heads = cfg.num_key_value_heads
    x = w["model.embed_tokens.weight"][tokens]
    positions = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        y = _rms(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (y @ w[p + "self_attn.q_proj.weight"].T).view(b, s, heads, d).transpose(1, 2)
        k = (y @ w[p + "self_attn.k_proj.weight"].T).view(b, s, kv_heads, d).transpose(1, 2)
        v = (y @ w[p + "self_attn.v_proj.weight"].T).view(b, s, kv_heads, d).transpose(1, 2)
        q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (scores @ v).transpose(1, 2).reshape(b, s, h)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if not cfg.is_moe_layer(layer):
            x = x + _swiglu(y, w, p + "mlp.")
            continue
        flat = y.reshape(-1, h)
        probs = (flat @ w[p + "mlp.gate.weight"].T).softmax(-1)
        top_w, top_i = probs.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
        else:
            top_w = top_w * cfg.routed_scaling_factor
        out = torch.zeros_like(flat)
        for e in range(cfg.n_routed_experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if len(rows):
                out[rows] += top_w[rows, slot, None] * _swiglu(flat[rows], w, p + f"mlp.experts.{e}.")
        if cfg.n_shared_experts:
            out = out + _swiglu(flat, w, p + "mlp.shared_experts.")
        x = x + out.view(b, s, h)
    x = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    return x @ w["lm_head.weight"].T
