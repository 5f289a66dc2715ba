"""Frozen-aware routed experts on grouped GEMMs: a drop-in replacement for Megatron-Core's SequentialMLP.

The local experts of a layer live in two groups, each stored as stacked nn.Linear-style Parameters:
`fc1_trainable [E_t, 2F, H]`, `fc2_trainable [E_t, H, F]` and `fc1_frozen [E_f, 2F, H]`, `fc2_frozen [E_f, H, F]`
(fc1 rows are [gate; up] as in Megatron's `linear_fc1`). Each group runs one grouped GEMM per projection, so:
* a frozen group has `requires_grad=False`: autograd skips its weight-gradient GEMM and does not save its inputs;
  Megatron DDP gives it no grad buffer (no all-reduce) and `get_megatron_optimizer` gives it no state and no weight
  decay (it only sees `requires_grad` parameters);
* a trainable expert with zero tokens still gets a (zero) gradient, so DDP's per-parameter hooks fire.

Forward contract is SequentialMLP's: `(permuted_local_hidden_states [T, H], tokens_per_expert [E_local],
permuted_probs [T]) -> (output [T, H], None)`, rows sorted by local expert. Probabilities are applied after the
activation (or on the input with `moe_apply_probs_on_input`), exactly as MLP.forward does with `per_token_scale`;
with `bias_activation_fusion` through the same fused kernel MLP.forward uses (`weighted_bias_swiglu_impl`), and with
the FP8 backend through experts/fp8_swiglu.py (quantization fused into the SwiGLU kernels).
Checkpoint layout: see checkpoint.py. Expert tensor parallelism must be 1 (the model provider sets it).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from megatron.core.tensor_parallel.random import (CheckpointWithoutOutput, get_cuda_rng_tracker,
                                                  get_expert_parallel_rng_tracker_name)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_esft.experts import checkpoint as ckpt
from megatron_esft.experts.grouped_mm import (contiguous_grad, group_offsets, grouped_mm_supported,
                                              grouped_mm_takes_device_offsets, looped_mm, to_device_async,
                                              with_zero_grads_of_empty_groups)
from megatron_esft.experts.permutation import (index_range, inverse_permutation, permute_rows, permute_rows_of_tokens,
                                               token_mapping, unpermute_tokens)


GROUPS = ("trainable", "frozen")
GEMM_BACKENDS = ("bf16", "fp8")
# "host": the dispatcher copies the token counts to the host (one sync per MoE layer) and each group runs its own
# grouped GEMMs; "device": they stay on the device where the experts can do without (experts/device_counts.py)
TOKEN_COUNTS = ("host", "device")


class FrozenAwareGroupedExperts(MegatronModule):
    """Routed experts split into a trainable and a frozen group, each computed with `torch._grouped_mm`."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: Optional[MLPSubmodules] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.submodules = submodules  # kept for spec compatibility; the projections are built in here
        if self.tp_group is not None and self.tp_group.size() != 1:
            raise ValueError("FrozenAwareGroupedExperts needs expert_tensor_parallel_size == 1")
        if config.add_bias_linear:
            raise ValueError("FrozenAwareGroupedExperts does not support expert biases (add_bias_linear=True)")
        if config.moe_latent_size is not None or config.fp8 or getattr(config, "fp4", None):
            raise ValueError("FrozenAwareGroupedExperts: moe_latent_size / fp8 / fp4 are not supported yet")
        if config.use_te_activation_func:
            raise ValueError("FrozenAwareGroupedExperts: use_te_activation_func is not supported")
        if config.bias_activation_fusion and not self._plain_swiglu():
            # the same restriction as MLP.forward's fused path with per-token scales
            raise ValueError("FrozenAwareGroupedExperts: bias_activation_fusion supports plain SwiGLU only")

        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        self._shapes = {"fc1": (fc1_out, hidden), "fc2": (hidden, ffn)}
        device = torch.device("cpu") if config.use_cpu_initialization else torch.device(torch.cuda.current_device())
        fc1 = torch.empty(num_local_experts, fc1_out, hidden, dtype=config.params_dtype, device=device)
        fc2 = torch.empty(num_local_experts, hidden, ffn, dtype=config.params_dtype, device=device)
        if config.perform_initialization:
            # Per expert, like SequentialMLP's linears: CPU init uses the default generator, GPU init the
            # expert-parallel RNG tracker (so experts on different EP ranks differ).
            rng = contextlib.nullcontext() if config.use_cpu_initialization else get_cuda_rng_tracker().fork(
                get_expert_parallel_rng_tracker_name()
            )
            with torch.no_grad(), rng:
                for e in range(num_local_experts):
                    config.init_method(fc1[e])
                    config.output_layer_init_method(fc2[e])
        self._group_ids: dict[str, list[int]] = {"trainable": list(range(num_local_experts)), "frozen": []}
        self._install({"fc1": fc1, "fc2": fc2})
        self.gemm_backend, self._fp8_cache, self._fp8_stacks = "bf16", None, None
        self.token_counts, self._stacks = "host", None  # set_token_counts
        self._frozen_offloaded_from: Optional[torch.device] = None  # set while the frozen weights are in host memory
        self._device_constants: dict[tuple, torch.Tensor] = {}  # _on_device
        # selective recompute "moe_act" (Megatron-Core's name; models/provider.py lets it through for these experts)
        self.activation_recompute = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or ()))

    def set_gemm_backend(self, backend: str, fp8_weight_cache: str = "frozen") -> None:
        """"bf16": torch._grouped_mm in the parameters' dtype (default). "fp8": row-wise scaled e4m3 forward and
        dgrad, bf16 wgrad for trainable groups (experts/fp8.py); bf16 parameters and K, N multiples of 16 needed.
        `fp8_weight_cache`: "frozen" (keep quantized frozen weights), "all" or "none" (see fp8.FP8WeightCache)."""
        if backend not in GEMM_BACKENDS:
            raise ValueError(f"unknown expert GEMM backend {backend!r} (choose from {', '.join(GEMM_BACKENDS)})")
        if self.frozen_weights_offloaded and (backend != "fp8" or fp8_weight_cache == "none"):
            raise ValueError(f"the frozen experts' weights are in host memory: the {backend} backend with weight cache "
                             f"{fp8_weight_cache!r} would read them there (call reload_frozen_weights() first)")
        if backend == "fp8":
            from megatron_esft.experts.fp8 import FP8WeightCache

            hidden, ffn = self.config.hidden_size, self.config.moe_ffn_hidden_size
            if self.config.params_dtype != torch.bfloat16 or hidden % 16 or ffn % 16:
                raise ValueError(f"fp8 experts need bf16 parameters and hidden/ffn sizes that are multiples of 16 "
                                 f"(got {self.config.params_dtype}, {hidden}, {ffn})")
            from megatron_esft.experts.fp8_device_counts import FP8StackedWeights

            self._fp8_cache = FP8WeightCache(fp8_weight_cache)
            self._fp8_stacks = FP8StackedWeights(self._fp8_cache)  # the FP8 device counts' (fp8_device_counts.py)
        else:
            self._fp8_cache = self._fp8_stacks = None
        self.gemm_backend = backend

    def set_token_counts(self, mode: str) -> None:
        """"host" (default) or "device": keep the token counts on the device where possible (one rank for all
        experts, the bf16 backend, experts/device_counts.py); `counts_on_device()` says whether it applies."""
        if mode not in TOKEN_COUNTS:
            raise ValueError(f"unknown token counts mode {mode!r} (choose from {', '.join(TOKEN_COUNTS)})")
        if mode == "device" and self._stacks is None:
            from megatron_esft.experts.device_counts import StackedWeights

            self._stacks = StackedWeights()
        self.token_counts = mode

    def counts_on_device(self) -> bool:
        """Whether the next forward from tokens runs with device token counts (the dispatcher then skips its copy of
        them to the host): the "device" mode, grouped GEMMs that read their offsets on the device (bf16 on Hopper or
        Blackwell, any CPU; or FP8 with a weight cache, plain SwiGLU), probabilities after the activation, all
        experts on this rank (bf16: and not in host memory)."""
        if self.token_counts != "device" or self.config.moe_apply_probs_on_input or self.ep_group.size() != 1:
            return False
        if self.gemm_backend == "fp8" and (self._fp8_cache.policy == "none" or not self._plain_swiglu()):
            return False
        if self.gemm_backend == "bf16" and self.frozen_weights_offloaded:
            return False
        return self._grouped_gemms_supported(self.fc1_frozen.dtype,
                                             self._frozen_offloaded_from or self.fc1_frozen.device)

    def _grouped_gemms_supported(self, dtype, device) -> bool:
        """Grouped GEMM kernels for both projections that take their group offsets on the device."""
        (n2f, h), f = self._shapes["fc1"], self._shapes["fc2"][1]
        return (grouped_mm_takes_device_offsets(dtype, device) and grouped_mm_supported(dtype, device, h, n2f)
                and grouped_mm_supported(dtype, device, f, h))

    # ----------------------------------------------------------------------------------------------- partitioning
    @property
    def trainable_local_experts(self) -> list[int]:
        return list(self._group_ids["trainable"])

    @property
    def frozen_local_experts(self) -> list[int]:
        return list(self._group_ids["frozen"])

    @property
    def local_to_global(self) -> list[int]:
        offset = self.ep_group.rank() * self.num_local_experts
        return [offset + j for j in range(self.num_local_experts)]

    def placement(self, local_idx: int) -> tuple[str, int]:
        """(group, row) of a local expert."""
        return self._placement[local_idx]

    def expert_weight(self, proj: str, local_idx: int) -> torch.Tensor:
        """The [out, in] weight of one local expert (a view of its group Parameter)."""
        group, row = self._placement[local_idx]
        return getattr(self, f"{proj}_{group}")[row]

    def set_trainable_experts(self, local_expert_ids: Iterable[int]) -> None:
        """Re-partition the local experts: `local_expert_ids` trainable, the rest frozen. Values are unchanged.

        Call before Megatron DDP / the optimizer are built: the group Parameters are replaced by new ones.
        """
        if self.frozen_weights_offloaded:
            raise ValueError("set_trainable_experts: the frozen experts' weights are in host memory "
                             "(call reload_frozen_weights() first)")
        ids = sorted(set(int(i) for i in local_expert_ids))
        if any(i < 0 or i >= self.num_local_experts for i in ids):
            raise ValueError(f"local expert ids {ids} out of range [0, {self.num_local_experts})")
        with torch.no_grad():
            full = {p: torch.stack([self.expert_weight(p, j) for j in range(self.num_local_experts)])
                    for p in ckpt.PROJECTIONS}
        self._group_ids = {"trainable": ids, "frozen": [j for j in range(self.num_local_experts) if j not in ids]}
        self._install(full)
        if getattr(self, "_stacks", None) is not None:
            self._stacks.clear()
        if getattr(self, "_fp8_cache", None) is not None:
            self._fp8_cache.clear()  # keyed by the replaced Parameters
            self._fp8_stacks.clear()

    def _install(self, full: dict[str, torch.Tensor]) -> None:
        """(Re)create the group Parameters from full [E_local, out, in] stacks, with Megatron's parameter attributes."""
        self._placement = {}
        for group in GROUPS:
            ids = self._group_ids[group]
            for row, j in enumerate(ids):
                self._placement[j] = (group, row)
            for proj in ckpt.PROJECTIONS:
                data = full[proj][ids].contiguous() if ids else full[proj].new_empty(0, *self._shapes[proj])
                param = torch.nn.Parameter(data, requires_grad=(group == "trainable" and len(ids) > 0))
                # Same attributes as ColumnParallelLinear / RowParallelLinear weights of SequentialMLP's experts:
                # `allreduce=False` under EP puts them in DDP's expert buffers (reduced over the expert-DP group).
                param.allreduce = not (self.config.expert_model_parallel_size > 1)
                param.tensor_model_parallel = True
                param.partition_dim = 1 if proj == "fc1" else 2
                param.partition_stride = 2 if (proj == "fc1" and self.config.gated_linear_unit) else 1
                setattr(self, f"{proj}_{group}", param)

    # ------------------------------------------------------------------------------- frozen weights in host memory
    @property
    def frozen_weights_offloaded(self) -> bool:
        return self._frozen_offloaded_from is not None

    def offload_frozen_weights(self) -> int:
        """Move the frozen experts' weights to host memory (pinned when CUDA is available), keeping only their FP8
        quantizations on the compute device; returns the bytes moved.

        With FP8 experts and a weight cache, the forward and input-gradient GEMMs of frozen experts read only the
        cached e4m3 copies (2 bytes per parameter for the two layouts) and the frozen weights get no gradient, so
        their bf16 values (2 more bytes per parameter: together ~90 % of a DeepSeek MoE model) are needed again only
        by checkpoints and exports, which read them from host memory. The quantizations are made here, while the
        weights are still on the device; if a weight changes later (a checkpoint load copies into it), the cache sees
        the new version and re-quantizes from a device copy of it. Call after `set_trainable_experts` and
        `set_gemm_backend("fp8", "frozen" or "all")`; the Parameters stay the same objects (optimizer, DDP and
        checkpoint factories keep referring to them)."""
        if self.gemm_backend != "fp8" or self._fp8_cache.policy == "none":
            raise ValueError("offloading frozen expert weights needs the fp8 backend with a weight cache ('frozen' or "
                             "'all'): otherwise every step would read the weights from host memory")
        if self.frozen_weights_offloaded or not self._group_ids["frozen"]:
            return 0
        device, moved = self.fc1_frozen.device, 0
        for proj in ckpt.PROJECTIONS:
            param = getattr(self, f"{proj}_frozen")
            for layout in ("nk", "kn"):  # the forward and the input-gradient operand
                self._fp8_cache.get(param, layout, device)
            host = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=device.type == "cuda")
            host.copy_(param.detach())
            param.data = host  # keeps the Parameter object and its version (the cache entries stay valid)
            moved += host.numel() * host.element_size()
        self._frozen_offloaded_from = device
        return moved

    def reload_frozen_weights(self) -> int:
        """Undo `offload_frozen_weights`: the frozen weights back on the compute device; returns the bytes moved."""
        if not self.frozen_weights_offloaded:
            return 0
        moved = 0
        for proj in ckpt.PROJECTIONS:
            param = getattr(self, f"{proj}_frozen")
            param.data = param.detach().to(self._frozen_offloaded_from)
            moved += param.numel() * param.element_size()
        self._frozen_offloaded_from = None
        return moved

    # ---------------------------------------------------------------------------------------------------- compute
    def _grouped_mm(self, a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The grouped GEMM seam (an FP8 `torch._scaled_grouped_mm` path plugs in here): a [M, K] x b_t [G, K, N]."""
        return torch._grouped_mm(a, b_t, offs=offs)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], offs) -> torch.Tensor:
        if weight.device != x.device and (offs is None or self.gemm_backend != "fp8"):
            raise RuntimeError(f"expert weights on {weight.device}, tokens on {x.device}: offloaded frozen weights "
                               f"are read only through the FP8 weight cache (grouped GEMMs)")
        if offs is None:
            return looped_mm(x, weight, counts)
        if self.gemm_backend == "fp8":
            from megatron_esft.experts.fp8 import fp8_grouped_mm

            return contiguous_grad(fp8_grouped_mm(x, weight, offs, self._fp8_cache))
        return contiguous_grad(self._grouped_mm(x, with_zero_grads_of_empty_groups(weight, offs).transpose(-2, -1),
                                                offs))

    def _plain_swiglu(self) -> bool:
        """silu(gate) * up without clamping or offset: the activation the fused kernels implement."""
        config = self.config
        return (config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
                and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)

    def _group_mlp(self, group: str, x: torch.Tensor, probs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        fc1, fc2 = getattr(self, f"fc1_{group}"), getattr(self, f"fc2_{group}")
        use_grouped = grouped_mm_supported(x.dtype, x.device, x.shape[1], fc1.shape[1]) and grouped_mm_supported(
            x.dtype, x.device, fc2.shape[2], fc2.shape[1]
        )
        offs = None
        if use_grouped:
            offs = group_offsets(counts, x.device)
        if self.gemm_backend == "fp8" and offs is not None and self._plain_swiglu() and x.shape[0] > 0:
            from megatron_esft.experts.fp8_swiglu import fp8_swiglu_mlp

            return contiguous_grad(fp8_swiglu_mlp(x, probs, fc1, fc2, offs, self._fp8_cache))
        h = self._gemm(x, fc1, counts, offs)
        if not (self.activation_recompute and fc2.requires_grad and h.shape[0] > 0):
            return self._gemm(self._weighted_activation(h, probs), fc2, counts, offs)
        # "moe_act" selective recompute, as in Megatron's TEGroupedMLP: only a trainable fc2 saves the activation
        # (for its weight gradient); drop it after the GEMM and recompute it from h when fc2's gradient arrives
        checkpoint = CheckpointWithoutOutput(fp8=None)  # fp8=None: no Transformer Engine FP8 state to restore
        act = checkpoint.checkpoint(self._weighted_activation, h, probs)
        out = self._gemm(act, fc2, counts, offs)
        checkpoint.discard_output_and_register_recompute(out)
        return out

    def _weighted_activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The activation scaled by the router probabilities (MLP.forward's per_token_scale)."""
        if self.config.bias_activation_fusion and h.shape[0] > 0:
            # MLP.forward's fused path for per-token scales: one compiled kernel forward, one backward
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1))
        return (self._activation(h) * probs.unsqueeze(-1)).to(h.dtype)

    def _regroup_permutation(self, tokens_per_expert: torch.Tensor, total: int, device) -> Optional[torch.Tensor]:
        """Row permutation that makes each group's rows contiguous (None when they already are)."""
        order = self._group_order()
        if order is None:
            return None
        rank_of = self._on_device(order[1], device)  # expert id -> its position in the group order
        expert_of_row = torch.repeat_interleave(index_range(0, self.num_local_experts, 1, device),
                                                to_device_async(tokens_per_expert, device), output_size=total)
        return torch.argsort(rank_of[expert_of_row], stable=True)

    def _group_order(self) -> Optional[tuple[list[int], list[int]]]:
        """(order, rank): the local experts in group order (trainable first) and each expert's position in it; None
        when that is the experts' own order."""
        order = self._group_ids["trainable"] + self._group_ids["frozen"]
        if order == sorted(order):
            return None
        rank = [0] * len(order)
        for position, expert in enumerate(order):
            rank[expert] = position
        return order, rank

    def _group_order_on_device(self, device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        order = self._group_order()
        return (None, None) if order is None else (self._on_device(order[0], device), self._on_device(order[1], device))

    def _on_device(self, values: Sequence[int], device) -> torch.Tensor:
        """`values` as a long tensor on `device`, made once per distinct value list (a host-to-device copy in every
        step would synchronize the stream, see grouped_mm.to_device_async)."""
        key = (tuple(values), str(device))
        if key not in self._device_constants:
            self._device_constants[key] = torch.tensor(values, dtype=torch.long).to(device)
        return self._device_constants[key]

    # GatherPermutationMoELayer may call forward with un-permuted tokens and the routing map (EP = expert-TP = 1)
    takes_tokens = True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, routing_map=None):
        """SequentialMLP's contract; with `routing_map` [T, E_local] bool instead, the first argument is the
        un-permuted tokens [T, H] and the third the router probabilities [T, E_local], and the output is the
        routed MoE output per token [T, H] (each token's k expert outputs summed): the experts permute the tokens
        themselves (experts/permutation.py "experts")."""
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.tensor(tokens_per_expert, dtype=torch.long)
        if routing_map is not None and tokens_per_expert.device == routing_map.device and self.counts_on_device():
            return self._forward_tokens_device_counts(permuted_local_hidden_states, routing_map, permuted_probs), None
        counts = [int(c) for c in tokens_per_expert.tolist()]  # host sync, as SequentialMLP / TEGroupedMLP
        if routing_map is not None:
            return self._forward_tokens(permuted_local_hidden_states, routing_map, permuted_probs, counts), None
        x, probs = permuted_local_hidden_states, permuted_probs
        perm = self._regroup_permutation(tokens_per_expert, x.shape[0], x.device)
        if perm is not None:
            inverse = inverse_permutation(perm)
            x, probs = permute_rows(x, perm, inverse), permute_rows(probs, perm, inverse)
        output = self._groups_forward(x, probs, counts)
        if perm is not None:
            output = permute_rows(output, inverse, perm)
        return output, None

    def _forward_tokens(self, tokens, routing_map, probs, counts):
        expert_order, expert_rank = self._group_order_on_device(tokens.device)
        permuted_probs, mapping = token_mapping(probs, routing_map, self.config.moe_router_topk, expert_order,
                                                expert_rank)
        if self._fp8_tokens_path(tokens):
            from megatron_esft.experts.fp8_swiglu import fp8_swiglu_moe

            groups = [(getattr(self, f"fc1_{g}"), getattr(self, f"fc2_{g}"), [counts[j] for j in self._group_ids[g]])
                      for g in GROUPS if self._group_ids[g]]
            return fp8_swiglu_moe(tokens, permuted_probs, groups, mapping, self._fp8_cache)
        rows = permute_rows_of_tokens(tokens, mapping)
        return unpermute_tokens(self._groups_forward(rows, permuted_probs, counts), mapping)

    def _forward_tokens_device_counts(self, tokens, routing_map, probs):
        """One grouped GEMM per projection over all experts, group offsets on the device (device_counts.py; FP8:
        fp8_device_counts.py)."""
        # the group offsets come from the permutation's sorted keys: the dispatcher's counts (by expert id) are not read
        permuted_probs, mapping, offs = token_mapping(probs, routing_map, self.config.moe_router_topk,
                                                      *self._group_order_on_device(tokens.device), offsets=True)
        if self.gemm_backend == "fp8":
            from megatron_esft.experts.fp8_device_counts import fp8_device_counts_moe

            return fp8_device_counts_moe(tokens, permuted_probs, self.fc1_trainable, self.fc2_trainable,
                                         self.fc1_frozen, self.fc2_frozen, self._fp8_stacks, offs, mapping)
        from megatron_esft.experts.device_counts import DeviceCountsExpertMLP

        stacks = [self._stacks.get(getattr(self, f"{p}_trainable"), getattr(self, f"{p}_frozen"), p)
                  for p in ckpt.PROJECTIONS]
        return DeviceCountsExpertMLP.apply(tokens, permuted_probs, self.fc1_trainable, self.fc2_trainable, *stacks,
                                           offs, len(self._group_ids["trainable"]), mapping, self._weighted_activation)

    def _fp8_tokens_path(self, tokens) -> bool:
        """FP8 with the tokens quantized before the gather: plain SwiGLU experts on grouped GEMMs."""
        if self.gemm_backend != "fp8" or not self._plain_swiglu() or self.config.moe_apply_probs_on_input:
            return False
        return self._grouped_gemms_supported(tokens.dtype, tokens.device)

    def _groups_forward(self, x, probs, counts):
        """Expert outputs for rows grouped trainable-first, each group's rows by expert."""
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        outputs, start = [], 0
        for group in GROUPS:
            ids = self._group_ids[group]
            if not ids:
                continue
            group_counts = [counts[j] for j in ids]
            rows = sum(group_counts)
            x_group = x[start : start + rows]
            if rows < x.shape[0] and getattr(self, f"fc1_{group}").requires_grad:
                # fc1's weight gradient saves its input: a view would keep all T*k rows alive until backward
                # (~0.1 GiB per V2-Lite layer at seq 4096), a copy keeps only this group's (~10 % with ESFT)
                x_group = x_group.clone()
            outputs.append(self._group_mlp(group, x_group, probs[start : start + rows], group_counts))
            start += rows
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def backward_dw(self):
        """Weight gradients are computed in the main backward (no delayed wgrad)."""

    # ------------------------------------------------------------------------------------------------- checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # SequentialMLP's names: local_experts.{j}.linear_fc{1,2}.{weight,_extra_state}
        for j in range(self.num_local_experts):
            for proj in ckpt.PROJECTIONS:
                weight = self.expert_weight(proj, j)
                key = f"{prefix}local_experts.{j}.linear_{proj}.weight"
                destination[key] = weight if keep_vars else weight.detach()
                destination[f"{prefix}local_experts.{j}.linear_{proj}._extra_state"] = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Accepts SequentialMLP's per-expert keys and the group keys a dist_checkpointing load returns."""
        ckpt.load_state_dict(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """SequentialMLP's on-disk layout; one factory per group Parameter (see checkpoint.py)."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = {}
        for group in GROUPS:
            ids = self._group_ids[group]
            if not ids:
                continue
            for proj in ckpt.PROJECTIONS:
                param = getattr(self, f"{proj}_{group}")
                sharded[f"{prefix}{proj}_{group}"] = ckpt.group_factory(
                    self, proj, param, ids, prefix, sharded_offsets, metadata
                )
        for j in range(self.num_local_experts):
            for proj in ckpt.PROJECTIONS:
                sharded.update(ckpt.extra_state_entries(
                    self, proj, j, self.expert_weight(proj, j).detach(), prefix, sharded_offsets, metadata
                ))
        return sharded
