"""Which tensors of a Hugging Face checkpoint differ from another's, and whether they are exactly an expert config's.

What a user checks before shipping an ESFT model: the merged export (tools/convert_mcore_to_hf.py, or
tools/export_esft.py --merge-into-hf) against the base it was trained from must differ in the selected experts'
weights and nowhere else. Tensors are compared bit for bit, one at a time, memory-mapped (safetensors_io), so two
31 GB DeepSeek-V2-Lite checkpoints need no more memory than their largest tensor.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_esft.checkpoint.adapter import ROUTED_EXPERT, in_adapter
from megatron_esft.checkpoint.safetensors_io import SafetensorsReader
from megatron_esft.errors import UserError


@dataclasses.dataclass
class CheckpointDiff:
    tensors: int  # compared
    changed: list[str]  # names whose bits differ
    changed_experts: dict[int, list[int]]  # layer -> routed experts with a changed tensor
    changed_other: list[str]  # changed tensors that are not routed-expert weights

    def to_json_dict(self) -> dict:
        return {"tensors": self.tensors, "changed": len(self.changed),
                "changed_experts": {str(k): v for k, v in sorted(self.changed_experts.items())},
                "changed_other": self.changed_other}


def diff_checkpoints(base_dir: str, other_dir: str) -> CheckpointDiff:
    """Compare every tensor of two HF checkpoints of the same model (a UserError when the names, shapes or dtypes
    differ: then they are not two versions of one model)."""
    base, other = SafetensorsReader(base_dir), SafetensorsReader(other_dir)
    if set(base.keys()) != set(other.keys()):
        only = sorted(set(base.keys()) ^ set(other.keys()))
        where = base_dir if only[0] in base else other_dir
        raise UserError(f"{other_dir}: not the same tensors as {base_dir} ({len(only)} differ, e.g. {only[0]} only "
                        f"in {where})")
    changed = []
    for name in base.keys():
        if (base.dtype(name), base.shape(name)) != (other.dtype(name), other.shape(name)):
            raise UserError(f"{other_dir}: tensor {name} is {other.dtype(name)} {list(other.shape(name))}, "
                            f"{base_dir} has {base.dtype(name)} {list(base.shape(name))}")
        a, b = base.get(name), other.get(name)
        if not torch.equal(_bits(a), _bits(b)):
            changed.append(name)
    experts, others = _by_expert(changed)
    return CheckpointDiff(len(base.keys()), changed, experts, others)


def _by_expert(names: list[str]) -> tuple[dict[int, list[int]], list[str]]:
    """({layer: sorted routed experts named}, the names that are not routed-expert weights)."""
    experts: dict[int, set[int]] = {}
    others = []
    for name in names:
        routed = ROUTED_EXPERT.match(name)
        if routed:
            experts.setdefault(int(routed.group(1)), set()).add(int(routed.group(2)))
        else:
            others.append(name)
    return {layer: sorted(ids) for layer, ids in experts.items()}, others


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: NaNs with equal bits compare equal, +0.0 and -0.0 do not."""
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.reshape(-1)


def mismatch_with_expert_config(diff: CheckpointDiff, ecfg) -> str | None:
    """Why `diff` is not exactly an ESFT run of the expert config `ecfg` (esft.expert_config.ExpertConfig), or None.
    A selected expert may be unchanged (no token reached it in training); a changed tensor that the config does not
    train (adapter.in_adapter: what the official `to_esft` leaves trainable) is a mismatch."""
    experts, others = _by_expert([name for name in diff.changed if not in_adapter(name, ecfg)])
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        return f"tensor {others[0]}{more} changed, which the expert config keeps frozen"
    if experts:
        layer = min(experts)
        return f"layer {layer}: routed experts {experts[layer]} changed, which the expert config does not select"
    return None
