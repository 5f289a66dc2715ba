"""DeepSeek's block-wise FP8 checkpoints (the DeepSeek-V3/R1 release format), in and out.

The official V3/R1 Hugging Face checkpoints store every Linear weight of the decoder layers (attention projections,
dense MLP, routed and shared experts; not the router `mlp.gate.weight`, norms, embeddings or `lm_head`) as
`float8_e4m3fn`, each with a companion `<name>_scale_inv` (float32, one value per `weight_block_size` block, 128 x 128;
partial blocks at the edges), and declare it in config.json:

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}     (V3.1 adds "scale_fmt": "ue8m0")

The weight is `e4m3 value x scale_inv` of its block (DeepSeek's `fp8_cast_bf16.py` / `weight_dequant`: the product in
float32, then cast). Training happens in bf16, so conversion dequantizes; the way back re-quantizes a block with its
source scale when that reproduces the stored weights exactly, which is every block ESFT did not train (so frozen
weights come back byte for byte), and otherwise with a fresh scale `amax / 448` (a power of two when `scale_fmt` is
"ue8m0"), DeepSeek's own `weight_quant`.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_esft.errors import UserError

SCALE_SUFFIX = "_scale_inv"
FP8_SOURCE_SCALES = "fp8_source_scales.safetensors"  # in a converted checkpoint's hf_assets: the source's scales
E4M3_MAX = 448.0
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8_DTYPES


@dataclasses.dataclass(frozen=True)
class BlockFp8Format:
    block: tuple[int, int]
    scale_fmt: str = "float"  # "ue8m0": every scale a power of two (DeepSeek-V3.1)

    @classmethod
    def from_hf_config(cls, raw: dict, where: str) -> "BlockFp8Format | None":
        """The format declared by config.json's `quantization_config`; None when the checkpoint is not quantized."""
        qc = raw.get("quantization_config")
        if qc is None:
            return None
        field = f"{where}: field 'quantization_config"
        if not isinstance(qc, dict):
            raise UserError(f"{field}' must be an object")
        method = qc.get("quant_method")
        if method != "fp8":
            raise UserError(f"{field}.quant_method' is {method!r}: only DeepSeek's block-wise 'fp8' checkpoints are "
                            "read; dequantize this one to bf16 first")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UserError(f"{field}.fmt' is {qc.get('fmt')!r}; only 'e4m3' is supported")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise UserError(f"{field}.activation_scheme' is {qc.get('activation_scheme')!r}; only 'dynamic' "
                            "(no stored activation scales) is supported")
        block = qc.get("weight_block_size")
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise UserError(f"{field}.weight_block_size' must be two positive integers, got {block!r}")
        scale_fmt = qc.get("scale_fmt") or "float"
        if scale_fmt not in ("float", "ue8m0"):
            raise UserError(f"{field}.scale_fmt' is {scale_fmt!r}; expected 'float' or 'ue8m0'")
        return cls(block=(block[0], block[1]), scale_fmt=scale_fmt)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))

    def _expand(self, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Per-block values -> per-element (float32, the weight's shape)."""
        full = scale.float().repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return full[: shape[0], : shape[1]]

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (weight.float() * self._expand(scale, tuple(weight.shape))).to(dtype)

    def _fresh_scale(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        pad_rows, pad_cols = (-rows) % self.block[0], (-cols) % self.block[1]
        padded = torch.nn.functional.pad(weight.float().abs(), (0, pad_cols, 0, pad_rows))
        blocks = padded.view(padded.shape[0] // self.block[0], self.block[0], padded.shape[1] // self.block[1],
                             self.block[1])
        amax = blocks.amax(dim=(1, 3))
        scale = amax / E4M3_MAX
        if self.scale_fmt == "ue8m0":
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        return torch.where(amax > 0, scale, torch.ones_like(scale))  # an all-zero block: any scale; 1 is stable

    def quantize(self, weight: torch.Tensor, source_scale: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D weight -> (e4m3 weight, scale_inv). A block keeps `source_scale` where quantizing with it gives back
        exactly `weight` (as `weight`'s dtype); the others get a fresh amax scale."""
        scale = self._fresh_scale(weight)
        if source_scale is not None and tuple(source_scale.shape) == tuple(scale.shape):
            source = source_scale.float()
            again = self._cast(weight, source)
            same = self.dequantize(again, source, weight.dtype) == weight
            scale = torch.where(self._blocks_all(same), source, scale)
        return self._cast(weight, scale), scale.to(scale_dtype)

    def _cast(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scaled = weight.float() / self._expand(scale, tuple(weight.shape))
        return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def _blocks_all(self, elementwise: torch.Tensor) -> torch.Tensor:
        """Per-block AND of an element mask."""
        rows, cols = elementwise.shape
        pad = torch.nn.functional.pad(elementwise, (0, (-cols) % self.block[1], 0, (-rows) % self.block[0]),
                                      value=True)
        blocks = pad.view(pad.shape[0] // self.block[0], self.block[0], pad.shape[1] // self.block[1], self.block[1])
        return blocks.all(dim=3).all(dim=1)


class SourceForm:
    """Writes exported tensors the way the source HF checkpoint stored them: its dtype per tensor (a checkpoint's
    `hf_dtypes`), and for FP8 weights the e4m3 values plus their `_scale_inv`, re-quantized against the source scales
    kept in the checkpoint's hf_assets (FP8_SOURCE_SCALES)."""

    def __init__(self, meta: dict, assets_dir: str | None, where: str):
        self.hf_dtypes = meta.get("hf_dtypes", {})
        self.default = meta["params_dtype"]
        self.fmt = BlockFp8Format.from_hf_config(meta["hf_config"], where)
        self.scales: dict[str, torch.Tensor] = {}
        path = os.path.join(assets_dir, FP8_SOURCE_SCALES) if assets_dir else None
        if self.fmt is not None and path and os.path.isfile(path):
            from safetensors.torch import load_file

            self.scales = load_file(path)
        self.where = where

    def tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        scale = scale_name(name)
        # a weight with source scales was FP8 (checkpoints converted under EP/PP before the dtypes of every rank's
        # tensors were recorded lack some names)
        fallback = "float8_e4m3fn" if scale in self.scales else self.default
        dtype = getattr(torch, self.hf_dtypes.get(name, fallback))
        if not is_float8(dtype):
            return [(name, tensor.to(dtype))]
        if self.fmt is None:
            raise UserError(f"{self.where}: '{name}' was FP8 in the source but the config has no quantization_config")
        kept = self.scales.get(scale)
        scale_dtype = getattr(torch, self.hf_dtypes[scale]) if scale in self.hf_dtypes else (
            kept.dtype if kept is not None else torch.float32)
        weight, scales = self.fmt.quantize(tensor, kept, scale_dtype)
        return [(name, weight), (scale, scales)]
