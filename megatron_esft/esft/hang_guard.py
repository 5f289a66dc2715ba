"""The all-to-all hang guard: every rank must build the same autograd graph through every collective.

With everything upstream of an MoE layer frozen, the hidden states entering it do not require grad. An
expert-parallel rank whose local experts in that layer are all frozen then builds no graph through the token
dispatcher's all-to-alls, skips their backward, while the ranks that train an expert run it: the job hangs (the
official `train_ep.py` fixes this by forcing `requires_grad` on the MoE input of the first trained layer).

`install_hang_guard(model_chunks, first_layer_number)` does the same, identically on every rank and
driven by the *global* expert config (never by what this rank happens to hold):

* the input of the MoE block of layer `first_layer_number` (the first layer with anything trainable on any rank)
  gets `requires_grad_(True)`: from there on every rank's graph contains every dispatch/combine, so all ranks run
  the same backward collectives; frozen layers before it still need no backward at all;
* with full activation recompute the layers run inside Megatron's reentrant CheckpointFunction under `no_grad`, and
  a checkpointed chunk whose inputs do not require grad returns an output that does not either (the experts inside
  would get no gradient at all): the guard then sits on the decoder input instead;
* with selective "layernorm" recompute the pre-MLP norm runs in Megatron's CheckpointWithoutOutput, which records
  nothing to recompute from when its input does not require grad: the guard then sits on the layer's input (the
  dgrad of one more frozen attention block);
* pipeline parallelism: a stage whose layers all come before `first_layer_number` produces an output that does not
  require grad, and Megatron's schedule calls backward on it. Its decoder output is made to require grad, so the
  schedule's backward is a no-op there; later stages receive inputs that require grad from the p2p exchange.
"""

from __future__ import annotations

import torch

from megatron_esft.esft.freeze import _chunks, _unwrap, decoder_layers, is_moe_layer


def _force_requires_grad(tensor):
    if torch.is_tensor(tensor) and torch.is_grad_enabled() and not tensor.requires_grad and tensor.is_floating_point():
        # A tensor that does not require grad has no grad_fn; detaching makes it a fresh leaf (the original may be a
        # view of a frozen parameter's output and must not be modified in place).
        return tensor.detach().requires_grad_(True)
    return tensor


def _pre_hook_first_arg(module, args, kwargs):
    if args:
        return (_force_requires_grad(args[0]),) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=_force_requires_grad(kwargs["hidden_states"]))
    return args, kwargs


def _output_hook(module, args, output):
    if isinstance(output, tuple):
        return (_force_requires_grad(output[0]),) + tuple(output[1:])
    return _force_requires_grad(output)


def install_hang_guard(model_chunks, first_layer_number: int | None) -> list:
    """Install the hooks; returns their handles. `first_layer_number=None`: the embedding trains, nothing to do.
    Where the guard sits follows the model's own recompute settings (its config)."""
    if first_layer_number is None:
        return []
    handles = []
    for chunk in (_unwrap(c) for c in _chunks(model_chunks)):
        layers = list(decoder_layers([chunk]))
        if not layers:
            continue
        numbers = [n for n, _ in layers]
        if max(numbers) < first_layer_number:
            handles.append(chunk.decoder.register_forward_hook(_output_hook))  # a stage entirely upstream
            continue
        config = chunk.config
        if config.recompute_granularity == "full":
            handles.append(chunk.decoder.register_forward_pre_hook(_pre_hook_first_arg, with_kwargs=True))
            continue
        norm_recompute = config.recompute_granularity == "selective" and "layernorm" in (config.recompute_modules or ())
        for number, layer in layers:
            if number == first_layer_number and is_moe_layer(layer) and not norm_recompute:
                handles.append(layer.mlp.register_forward_pre_hook(_pre_hook_first_arg, with_kwargs=True))
            elif number == first_layer_number:
                handles.append(layer.register_forward_pre_hook(_pre_hook_first_arg, with_kwargs=True))
    return handles
