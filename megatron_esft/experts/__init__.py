"""ESFT-aware routed experts: a trainable and a frozen expert group per layer, each computed with one grouped GEMM.

* `FrozenAwareGroupedExperts` (grouped.py): drop-in for Megatron-Core's SequentialMLP (same constructor, forward and
  checkpoint layout), on `torch._grouped_mm` (CPU and GPU) with a per-expert loop fallback.
* `use_grouped_experts(spec)` (spec.py): swap the experts in a layer/block spec; `set_expert_gemm_backend(model,
  "fp8")` switches every such module to FP8 row-wise grouped GEMMs (fp8.py; H100/B200);
  `offload_frozen_expert_weights(model)` then keeps only the FP8 copies of frozen experts on the device;
  `note_expert_weights_updated(model)` after each optimizer step keeps cached FP8 copies of trained experts current;
  `set_expert_token_counts(model, "device")` keeps the token counts on the device (no host sync, device_counts.py).
"""

from megatron_esft.experts.grouped import FrozenAwareGroupedExperts
from megatron_esft.experts.spec import (note_expert_weights_updated, offload_frozen_expert_weights,
                                       set_expert_gemm_backend, set_expert_token_counts, use_grouped_experts)

__all__ = ["FrozenAwareGroupedExperts", "note_expert_weights_updated", "offload_frozen_expert_weights",
           "set_expert_gemm_backend", "set_expert_token_counts", "use_grouped_experts"]
