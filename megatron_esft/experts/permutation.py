"""Token permutation for dropless top-k routing without atomics or host syncs (what TE's `moe_permute_fusion` gives
Megatron-LM, which needs Transformer Engine).

Megatron-Core's unfused `permute` / `unpermute` (moe_utils.py) find the permuted rows with `masked_select` (a host
sync: its output size is data-dependent), scatter the rows back with an atomic `scatter_add_` in the activation
dtype (on a GPU, one bf16 rounding per expert a token visited) and take the permutation's gradient with index_select's atomic
`index_add`. With dropless top-k routing every token has exactly k rows, so the whole mapping is static in size:

* `topk_permutation(routing_map, k)` computes, on the device, which token each permuted row holds (`token_of_row`,
  rows by expert and then by token: Megatron's order) and the inverse, which row each (token, j-th expert) pair went
  to (`row_of_pair`).
* Permuting is the gather `tokens[token_of_row]`; un-permuting gathers `rows[row_of_pair]` and sums each token's k
  rows (`embedding_bag` with bags of k: one kernel, fp32 accumulation, one rounding). Each is the other's backward,
  so forward and backward are gathers: deterministic, no atomics, no host sync.

`GatherPermutationAlltoAllDispatcher` is Megatron's alltoall dispatcher with these two steps swapped in, and with the
second permutation (sorting the received chunks by local expert) skipped when there is a single chunk per expert
(EP = expert-TP = 1: the sort is the identity, but Megatron runs it as a split into E chunks and a `cat`, a full copy
of the rows in forward and backward, twice per layer). It falls back to Megatron's own code for token dropping,
padding for quantization, TE's fused permutation, or `moe_permutation = "megatron"`.

With a single rank for all experts (EP = expert-TP = 1) the dispatch and combine all-to-alls are identities, so by
default (`moe_permutation = "experts"`) the dispatcher hands the grouped experts the un-permuted tokens and the
routing map, and the experts permute them themselves (experts/grouped.py `forward(..., routing_map=)`): straight into
their trainable-then-frozen row order (`topk_permutation(..., expert_order)`), which saves the experts' own regroup
(a gather of all T*k rows in and one out, each with a gather backward), and, with FP8 experts, quantizes the T tokens
before the gather (row-wise scales commute with it) instead of the T*k rows after it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_esft.experts import pair_sum

# "experts": at EP = expert-TP = 1 the grouped experts permute the tokens themselves, straight into their
#   trainable-then-frozen row order (no separate regroup; FP8 quantizes the T tokens before the gather instead of
#   the T*k rows after it); elsewhere, or with experts that cannot, as "gather".
# "gather": this module's permutation in the dispatcher. "megatron": Megatron-Core's own.
PERMUTATIONS = ("experts", "gather", "megatron")


_INDEX_CONSTANTS: dict = {}


def index_range(start: int, stop: int, step: int, device) -> torch.Tensor:
    """`torch.arange(start, stop, step)` (long) on `device`, made once per arguments and device: the permutation's
    index constants depend only on the token and expert counts, and on a GPU every op a forward pass runs costs a
    kernel launch and host time. Read-only: nothing may write into it."""
    key = (start, stop, step, str(device))
    constant = _INDEX_CONSTANTS.get(key)
    if constant is None:
        if len(_INDEX_CONSTANTS) >= 64:  # token counts change rarely (sequence length, micro-batch size)
            _INDEX_CONSTANTS.clear()
        with torch.inference_mode(False):  # a normal tensor even if first asked for under inference_mode
            constant = _INDEX_CONSTANTS[key] = torch.arange(start, stop, step, device=device)
    return constant


def index_constants() -> list[torch.Tensor]:
    """The cached index constants: a captured CUDA graph reads them by address, so it holds these references (the
    cache may drop its entries) while it lives (training/cuda_graph.py)."""
    return list(_INDEX_CONSTANTS.values())


def _sorted_pairs(routing_map: torch.Tensor, topk: int, expert_rank: torch.Tensor | None):
    """(experts [T, k]: each token's k experts in ascending id, sorted keys [T*k], order [T*k]) where key =
    rank(expert) * T + token of pair p = t * k + j and `order` lists the pairs by key (row r holds pair order[r])."""
    num_tokens, device = routing_map.shape[0], routing_map.device
    # a router that chose fewer than k experts for a token would silently misroute here: checked on the device
    # (asynchronously on a GPU: no host sync)
    torch._assert_async(routing_map.sum(dim=1).eq(topk).all(), "routing map rows must have exactly top-k experts")
    # argsort rather than nonzero/masked_select: a static output size, so no host sync (Megatron's drop-and-pad path
    # uses the same call); stable, so a token's k experts come in ascending order
    experts = routing_map.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :topk]
    ranks = experts if expert_rank is None else expert_rank[experts]
    keys = torch.add(index_range(0, num_tokens, 1, device).unsqueeze(1), ranks, alpha=num_tokens)
    sorted_keys, order = keys.view(-1).sort()
    return experts, sorted_keys, order


def _ranks(expert_order: torch.Tensor | None, expert_rank: torch.Tensor | None):
    if expert_order is not None and expert_rank is None:
        expert_rank = inverse_permutation(expert_order)
    return expert_rank


def topk_permutation(routing_map: torch.Tensor, topk: int, expert_order: torch.Tensor | None = None):
    """(token_of_row [T*k], expert_of_row [T*k], row_of_pair [T*k]) for a [T, E] bool routing map with exactly `topk`
    experts per token (dropless top-k routing). Rows are ordered by expert, then by token, as Megatron's `permute`;
    with `expert_order` (a [E] long permutation of the experts) the experts' rows come in that order instead (the
    grouped experts' trainable-then-frozen order). Pair p = t * k + j is token t's j-th expert in ascending expert
    id whatever the row order, so a token's k rows are summed in the same order either way."""
    num_tokens = routing_map.shape[0]
    _, sorted_keys, order = _sorted_pairs(routing_map, topk, _ranks(expert_order, None))
    expert_of_row = sorted_keys // num_tokens
    if expert_order is not None:
        expert_of_row = expert_order[expert_of_row]
    return sorted_keys % num_tokens, expert_of_row, inverse_permutation(order)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inverse[perm[i]] = i, on perm's device (a scatter of unique indices: no atomics, no sync)."""
    return torch.empty_like(perm).scatter_(0, perm, index_range(0, perm.numel(), 1, perm.device))


def gather_rows(tokens, token_of_row):
    """tokens[token_of_row], bit for bit. Rows are moved as 8-byte words where they tile into them: CUDA's
    index_select copies one element per thread, so words move a bf16 row in a quarter of the copies and an e4m3 row
    in an eighth. Otherwise float8 rows go as bytes (index_select has no float8 kernels)."""
    words = _as_words(tokens)
    if words is not None:
        return words.index_select(0, token_of_row).view(tokens.dtype)
    if tokens.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tokens.view(torch.uint8).index_select(0, token_of_row).view(tokens.dtype)
    return tokens.index_select(0, token_of_row)


def _as_words(t):
    """t [N, H] viewed as int64 [N, H * itemsize / 8], or None where the rows do not tile into aligned words."""
    if t.dim() != 2 or t.element_size() >= 8 or t.stride(-1) != 1 or (t.shape[-1] * t.element_size()) % 8:
        return None
    try:
        return t.view(torch.int64)
    except RuntimeError:  # a row stride or a storage offset that is not a whole number of words
        return None


def sum_pairs(rows, row_of_pair, topk):
    """out[t] = sum over j of rows[row_of_pair[t * k + j]]: each token's k rows summed."""
    if topk == 1:  # a plain permutation: each "sum" is one row (rows may be 1-D here, e.g. probabilities)
        return rows.index_select(0, row_of_pair)
    if pair_sum.usable(rows, row_of_pair, topk):  # on a GPU: one Triton kernel, the same sums bit for bit
        out = pair_sum.pair_sum(rows, row_of_pair, topk)
        if out is not None:
            return out
    # embedding_bag gathers and sums each token's k rows in one kernel with a float accumulator (CPU and CUDA): no
    # [T*k, H] temporary (7x faster than index_select + sum on a CPU), no atomics; bags of k by cached offsets (with a
    # [T, k] input F.embedding_bag would make them with an arange every call)
    offsets = index_range(0, row_of_pair.numel(), topk, row_of_pair.device)
    return F.embedding_bag(row_of_pair, rows, offsets, mode="sum")


class _PermuteTokens(torch.autograd.Function):
    """tokens [T, H] -> rows [T*k, H]; backward: each token's k row gradients gathered and summed."""

    @staticmethod
    def forward(ctx, tokens, token_of_row, row_of_pair, topk):
        ctx.save_for_backward(row_of_pair)
        ctx.topk = topk
        return gather_rows(tokens, token_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_of_pair,) = ctx.saved_tensors
        return sum_pairs(grad_rows, row_of_pair, ctx.topk), None, None, None


class _UnpermuteTokens(torch.autograd.Function):
    """rows [T*k, H] -> tokens [T, H] (each token's k rows summed); backward: the gather of _PermuteTokens."""

    @staticmethod
    def forward(ctx, rows, token_of_row, row_of_pair, topk):
        ctx.save_for_backward(token_of_row)
        return sum_pairs(rows, row_of_pair, topk)

    @staticmethod
    def backward(ctx, grad_tokens):
        (token_of_row,) = ctx.saved_tensors
        return gather_rows(grad_tokens, token_of_row), None, None, None


def permute_rows(x, perm, inverse):
    """`x[perm]` for a permutation `perm` (rows of any shape), whose backward is the gather `grad[inverse]`:
    index_select's own backward is an atomic index_add into zeros (measured ~3x slower on an H100 for [T, 2048] bf16
    rows); for a permutation both are exact."""
    return _PermuteTokens.apply(x, perm, inverse, 1)


def token_mapping(probs, routing_map, topk, expert_order=None, expert_rank=None, offsets=False):
    """(permuted probs [T*k], mapping) of `topk_permutation` (see there for `expert_order` / `expert_rank`); the
    mapping is what `unpermute_tokens` takes: (token_of_row, row_of_pair, topk). With `offsets`, also each expert
    group's end row in the row order (int32 [E], the grouped GEMMs' `offs`), from the sorted keys: no host sync."""
    num_tokens, num_experts = routing_map.shape
    experts, sorted_keys, order = _sorted_pairs(routing_map, topk, _ranks(expert_order, expert_rank))
    token_of_row = sorted_keys % num_tokens
    # each pair's index into probs [T, E] (token * E + expert), in row order; T*k scalars: index_select's atomic
    # backward is negligible here
    pair_index = torch.add(index_range(0, num_tokens * num_experts, num_experts, probs.device).unsqueeze(1), experts)
    permuted_probs = probs.reshape(-1).index_select(0, pair_index.view(-1)[order])
    mapping = (token_of_row, inverse_permutation(order), topk)
    if not offsets:
        return permuted_probs, mapping
    # rows of the experts of rank < r + 1 are those whose key is below (r + 1) * T
    ends = index_range(num_tokens, num_tokens * (num_experts + 1), num_tokens, sorted_keys.device)
    return permuted_probs, mapping, torch.searchsorted(sorted_keys, ends, out_int32=True)


def permute_tokens(tokens, probs, routing_map, topk, expert_order=None):
    """Drop-in for Megatron's `permute(tokens, routing_map, probs=probs)` under dropless top-k routing: returns
    (permuted tokens, permuted probs, the mapping `unpermute_tokens` takes)."""
    permuted_probs, mapping = token_mapping(probs, routing_map, topk, expert_order)
    return permute_rows_of_tokens(tokens, mapping), permuted_probs, mapping


def permute_rows_of_tokens(tokens, mapping):
    """The rows [T*k, H] of `mapping` (from `token_mapping`) gathered from tokens [T, H]."""
    return _PermuteTokens.apply(tokens, *mapping)


def unpermute_tokens(rows, mapping):
    """Drop-in for Megatron's `unpermute(rows, sorted_indices, restore_shape)` (no probs: the experts applied them)."""
    token_of_row, row_of_pair, topk = mapping
    return _UnpermuteTokens.apply(rows, token_of_row, row_of_pair, topk)


class GatherPermutationAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron-Core's alltoall token dispatcher with the atomic-free, sync-free permutation (module docstring).
    `permutation` (one of PERMUTATIONS) can be switched at any time between forward passes."""

    permutation = "experts"
    # set by GatherPermutationMoELayer when its experts can take un-permuted tokens (`forward(..., routing_map=)`)
    experts_take_tokens = False
    # set by GatherPermutationMoELayer to the experts' `counts_on_device` when they have one: asked once per forward
    # whether the experts want the token counts left on the device (no copy to the host, no sync; "experts" only)
    experts_counts_on_device = None
    _counts_on_device = False

    def effective_permutation(self) -> str:
        """The permutation the next forward pass runs: "megatron", "gather" or "experts" (see PERMUTATIONS)."""
        config = self.config
        if self.permutation == "megatron" or self.drop_and_pad or config.moe_expert_capacity_factor is not None \
                or config.moe_router_padding_for_quantization or config.moe_permute_fusion:
            return "megatron"
        if self.permutation == "experts" and self.experts_take_tokens and self.tp_size * self.ep_size == 1:
            return "experts"
        return "gather"

    @property
    def experts_permute(self) -> bool:
        """Whether this forward hands the experts un-permuted tokens (decided once per forward, in
        dispatch_preprocess)."""
        return self._active == "experts"

    def _single_chunk_per_expert(self) -> bool:
        return self._active != "megatron" and self.tp_size * self.ep_size == 1

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self._active = self.effective_permutation()
        if self._active == "megatron":
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        # MoEAlltoAllTokenDispatcher.dispatch_preprocess with `permute` replaced (no padding branch: excluded above)
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self._counts_on_device = self._active == "experts" and bool(
            self.experts_counts_on_device is not None and self.experts_counts_on_device())
        if not self._counts_on_device:
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        if self._active == "experts":  # a single rank holds every expert: the all-to-alls are identities
            return hidden_states, probs
        rows, permuted_probs, self.reversed_local_input_permutation_mapping = permute_tokens(
            hidden_states, probs, routing_map, self.config.moe_router_topk)
        return rows, permuted_probs

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self._single_chunk_per_expert():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        # nothing to gather over TP and the sort by local expert is the identity: only the sync points remain
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        tokens_per_expert = self.tokens_per_expert
        if not self._counts_on_device:
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_2", self.tokens_per_expert)
            tokens_per_expert = self._maybe_dtoh_and_synchronize("before_finish", self.tokens_per_expert)
        self.tokens_per_expert = None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        if not self._single_chunk_per_expert():
            return super().combine_preprocess(hidden_states)
        return hidden_states

    def combine_postprocess(self, permutated_local_input_tokens):
        if self._active == "megatron":
            return super().combine_postprocess(permutated_local_input_tokens)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()
        output = permutated_local_input_tokens  # "experts": already un-permuted by the experts
        if self._active == "gather":
            output = unpermute_tokens(output, self.reversed_local_input_permutation_mapping)
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            if self._active == "experts":  # the combine all-to-all returned its input as is: not in place
                output = output + self.shared_experts.get_output()
            else:
                output += self.shared_experts.get_output()
        return output


class _SubclassKwargsNoteFilter(logging.Filter):
    """Megatron-Core 0.16.1's TransformerLayer hands the layer's process groups only to the MLP classes it knows by
    identity (`module in (MoELayer, ...)`); for a subclass it logs "Unknown MLP type: ... Using default kwargs" once
    per MoE layer (58 lines for V3) and the layer takes the default process groups, which are the layer's own: our
    models are built on the global parallel state. Nothing there for a user to act on; every other record passes."""

    note = "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.note)


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_SubclassKwargsNoteFilter())


class GatherPermutationMoELayer(MoELayer):
    """Megatron-Core's MoELayer whose alltoall dispatcher is a `GatherPermutationAlltoAllDispatcher`; with a single
    rank for all experts and experts that take un-permuted tokens (the grouped experts), the experts permute."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = GatherPermutationAlltoAllDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection or get_default_pg_collection())
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
            self.token_dispatcher.experts_take_tokens = bool(getattr(self.experts, "takes_tokens", False))
            self.token_dispatcher.experts_counts_on_device = getattr(self.experts, "counts_on_device", None)

    def routed_experts_compute(self, hidden_states, probs):
        dispatcher = self.token_dispatcher
        if not (isinstance(dispatcher, GatherPermutationAlltoAllDispatcher) and dispatcher.experts_permute):
            return super().routed_experts_compute(hidden_states, probs)
        tokens, tokens_per_expert, probs = dispatcher.dispatch_postprocess(hidden_states, probs)
        # through __call__ (hooks see tokens_per_expert as with Megatron's call); tokens [T, H], probs [T, E]
        output, mlp_bias = self.experts(tokens, tokens_per_expert, probs, routing_map=dispatcher.routing_map)
        return dispatcher.combine_preprocess(output), mlp_bias


def set_moe_permutation(model_chunks, permutation: str = "experts") -> int:
    """Select the token permutation (one of PERMUTATIONS, see there) of every MoE layer in a
    model (or list of model chunks); returns how many dispatchers were switched."""
    if permutation not in PERMUTATIONS:
        raise ValueError(f"unknown MoE permutation {permutation!r} (choose from {', '.join(PERMUTATIONS)})")
    from megatron_esft.esft.freeze import decoder_layers, is_moe_layer

    switched = 0
    for _, layer in decoder_layers(model_chunks):
        if is_moe_layer(layer) and isinstance(layer.mlp.token_dispatcher, GatherPermutationAlltoAllDispatcher):
            layer.mlp.token_dispatcher.permutation = permutation
            switched += 1
    return switched
