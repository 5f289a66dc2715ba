"""Layers per pipeline stage (models/provider.pipeline_stage_layers): Megatron-LM's even split and its uneven one
(--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers), checked against Megatron-Core's own
split of the same TransformerConfig; bad splits are one-line user errors naming the flags. Training on an uneven
split is tested in tests/training/test_parallel_training.py, score collection in tests/routing/test_collect_tool.py."""

import pytest
import torch

from megatron_esft.errors import UserError
from megatron_esft.models.provider import pipeline_stage_layers
from megatron_esft.parallel import ParallelConfig


def _parallel(pp, first=None, last=None):
    return ParallelConfig(pipeline_model_parallel_size=pp, decoder_first_pipeline_num_layers=first,
                          decoder_last_pipeline_num_layers=last)


def _megatron_split(num_layers, parallel):
    """Megatron-Core's own count per stage for the same config (TransformerConfig + get_num_layers_to_build)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                               pipeline_model_parallel_size=parallel.pp, pipeline_dtype=torch.float32,
                               num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
                               num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers)
    return [get_num_layers_to_build(config, pp_rank=rank) for rank in range(parallel.pp)]


@pytest.mark.parametrize("num_layers, pp, first, last, expected", [
    (4, 2, None, None, [2, 2]),
    (27, 3, None, None, [9, 9, 9]),
    (27, 2, 13, None, [13, 14]),            # V2-Lite over 2 stages
    (61, 8, 5, None, [5, 8, 8, 8, 8, 8, 8, 8]),  # DeepSeek-V3 over 8 stages
    (61, 4, None, 16, [15, 15, 15, 16]),
    (28, 4, 4, 6, [4, 9, 9, 6]),
    (4, 2, 1, 3, [1, 3]),
])
def test_split_matches_megatron(num_layers, pp, first, last, expected):
    parallel = _parallel(pp, first, last)
    assert pipeline_stage_layers(num_layers, parallel) == expected == _megatron_split(num_layers, parallel)


@pytest.mark.parametrize("num_layers, pp, first, last, message", [
    (27, 2, None, None, "27 layers are not divisible by --pipeline-model-parallel-size 2 (uneven stages: "),
    (4, 1, 1, None, "need --pipeline-model-parallel-size of at least 2"),
    (4, 2, 0, None, "--decoder-first-pipeline-num-layers 0: must be at least 1"),
    (4, 2, 1, 2, "1 layers left for 0 other stage(s)"),
    (61, 8, 6, None, "55 layers left for 7 other stage(s), which must split them evenly"),
    (5, 4, 1, 1, "3 layers left for 2 other stage(s)"),
    (4, 4, 2, 1, "1 layers left for 2 other stage(s)"),
])
def test_bad_splits_are_user_errors(num_layers, pp, first, last, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline_stage_layers(num_layers, _parallel(pp, first, last))
