"""Megatron-Core's GPTModel with the output layer and loss fused where that is exact enough and applies
(models/linear_cross_entropy.py): everything else is GPTModel's own code."""

from __future__ import annotations

import inspect

from megatron.core.models.gpt import GPTModel
from megatron.core.config_logger import has_config_logger_enabled

from megatron_esft.models.linear_cross_entropy import linear_cross_entropy

_POSTPROCESS = inspect.signature(GPTModel._postprocess)


class ESFTGPTModel(GPTModel):
    """GPTModel whose training loss runs `linear_cross_entropy` (the fusion "linear_cross_entropy") when the output
    weight is frozen, the tensor-parallel size is 1 and nothing else needs the logits (no multi-token prediction, no
    inference, no hooks on the output layer, no config logger); otherwise GPTModel's own output layer and loss."""

    linear_cross_entropy = False  # set by provider.build_model from the resolved fusions

    def _postprocess(self, *args, **kwargs):
        if self.linear_cross_entropy:
            call = _POSTPROCESS.bind(self, *args, **kwargs).arguments
            weight = self._frozen_output_weight(call)
            if weight is not None:
                return linear_cross_entropy(call["hidden_states"], weight, call["labels"])
        return super()._postprocess(*args, **kwargs)

    def _frozen_output_weight(self, call: dict):
        """The output weight when the fused loss applies to this call, else None."""
        if not self.post_process or call.get("labels") is None or call.get("mtp_in_postprocess"):
            return None
        if self.config.mtp_num_layers is not None or call.get("inference_context") is not None:
            return None
        layer = self.output_layer
        if layer.bias is not None or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if self.pg_collection.tp.size() != 1:  # a vocabulary-parallel loss needs cross-rank reductions per chunk
            return None
        if has_config_logger_enabled(self.config):
            return None
        weight = self.output_weight()
        return None if weight.requires_grad else weight

    def output_weight(self):
        """The weight of the output layer of this (last) pipeline stage, tied to the embedding or its own."""
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else self.output_layer.weight
