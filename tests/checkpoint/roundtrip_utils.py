"""Helpers for HF-space comparisons of checkpoints."""

from __future__ import annotations

import torch

from megatron_esft.checkpoint.safetensors_io import SafetensorsReader


def hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(directory)
    return {name: reader.get(name).clone() for name in reader.keys()}


def assert_bit_exact(src: str, dst: str) -> None:
    a, b = hf_tensors(src), hf_tensors(dst)
    assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))[:5]}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{name}: dtype {a[name].dtype} != {b[name].dtype}"
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name}: values differ"
