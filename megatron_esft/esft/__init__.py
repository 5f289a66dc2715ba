"""ESFT proper: the expert config (which routed experts a task trains), freezing and trainable-parameter accounting.

`expert_config` holds the official ESFT expert-config format and the mapping of its HF-style keys onto Megatron-Core
(layer key <-> `TransformerLayer.layer_number`, global expert id <-> (EP rank, local slot)).
"""

from megatron_esft.esft.expert_config import (  # noqa: F401
    ExpertConfig,
    ModelShape,
    expert_placement,
    global_expert_id,
    layer_key_to_layer_number,
    layer_number_to_layer_key,
    load_expert_config,
    save_expert_config,
)
