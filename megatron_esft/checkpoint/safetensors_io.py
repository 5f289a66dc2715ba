"""Hugging Face safetensors checkpoints: zero-copy reading and sharded writing.

Reading memory-maps each tensor and returns a tensor over the page cache (no copy), so converting a 16B checkpoint
does not need 32 GB of RAM: pages are read when a tensor is written out and can be evicted afterwards. Each tensor
gets its *own* mapping (numpy.memmap at the tensor's offset, copy-on-write) rather than being a view into one big
file mapping, because Megatron's checkpoint writer clones every tensor whose storage is larger than the tensor
(filesystem_async.py `_clone_if_needed`), which would copy the whole model into anonymous memory.
The safetensors header (8-byte little-endian length + JSON) is read with the safetensors library's own format and
offsets; `safe_open` validates every file first.

Writing produces `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (the transformers layout),
flushing a shard whenever it reaches `max_shard_bytes`, so only one shard is ever held in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import struct

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_esft.errors import UserError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # DeepSeek-V3/R1's released weights (checkpoint/fp8_blocks.py)
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsReader:
    """All tensors of a HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise UserError(f"{directory}: no such directory (expected a Hugging Face checkpoint)")
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise UserError(f"{directory}: no .safetensors weights found")
        self._entries: dict[str, tuple[str, int, torch.dtype, tuple[int, ...]]] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise UserError(f"{index}: lists missing file {name}")
            try:
                with safe_open(path, framework="pt"):  # validates the header and offsets
                    pass
            except Exception as exc:  # safetensors raises its own error types
                raise UserError(f"{path}: not a valid safetensors file ({exc})") from None
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                start, _ = info["data_offsets"]
                self._entries[key] = (path, base + start, _DTYPES[info["dtype"]], tuple(info["shape"]))

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][3]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, memory-mapped copy-on-write (reads come from the page cache; writes stay private)."""
        if name not in self._entries:
            raise UserError(f"{self.directory}: tensor '{name}' not found in the checkpoint")
        path, offset, dtype, shape = self._entries[name]
        count = 1
        for dim in shape:
            count *= dim
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(count * itemsize,))
        return torch.from_numpy(raw).view(dtype).view(shape)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap memory freed so far back to the OS. glibc keeps freed blocks for reuse, and a conversion's
    temporaries (an FP8 weight dequantized in float32 before it goes to scratch, re-quantized on export) left the
    process holding about the bf16 model size in private memory (docs/benchmarks.md). A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ScratchTensors:
    """File-backed tensors for values computed during a conversion (dequantized FP8 weights): like the reader's
    memory maps, their pages live in the page cache and can be written back and evicted, so converting a 671B FP8
    checkpoint does not hold its bf16 copy in RAM. The files are unlinked as soon as they are mapped (nothing is left
    behind, even by a killed process); `directory` is created and removed by the caller."""

    def __init__(self, directory: str):
        self.directory = directory
        self._count = 0

    def store(self, values: torch.Tensor) -> torch.Tensor:
        path = os.path.join(self.directory, f"{self._count:07d}.bin")
        self._count += 1
        size = values.numel() * values.element_size()
        if size == 0:
            return values.clone()
        raw = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size,))
        os.unlink(path)
        out = torch.from_numpy(raw).view(values.dtype).view(values.shape)
        out.copy_(values)
        return out


class ShardedSafetensorsWriter:
    """Writes tensors into size-bounded shards, then the index. Use inside a temporary directory."""

    def __init__(self, directory: str, max_shard_bytes: int = 4 * 1024**3):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, os.path.join(self.directory, f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        names = []
        for i, keys in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{i:05d}.tmp"), os.path.join(self.directory, final))
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}, fh, indent=2,
                          sort_keys=True)
        return names
