"""Megatron-LM's --check-for-nan-in-loss-and-grad (on by default; --no-check-for-nan-in-loss-and-grad turns it off).

A bf16 run has no loss scaler that would skip a bad step: an update with a NaN or Inf gradient writes NaN into the
trained weights, every later loss is NaN, and the next checkpoint (and any export of it) holds them. So before the
optimizer changes anything, the iteration's loss and the global gradient norm must be finite; otherwise the run stops
with one line that names the iteration and the last checkpoint, which still holds the last good weights.

Both values reach the host anyway, the same on every rank: the loss is all-reduced for the log, and Megatron-Core's
optimizer computes the gradient norm (all-reduced over the model-parallel ranks) for clipping. So every rank stops at
the same point. The only change in timing: the trainer reads the loss just before the step instead of just after it,
so the host waits for the backward a little earlier than at the gradient norm (the optimizer launches one gradient
copy per trained tensor in between: 52 with ESFT of V2-Lite). Megatron-LM instead checks each gradient bucket's local
norm before the data-parallel reduction (a host sync per bucket) and raises with a traceback; what is kept is the same.
"""

from __future__ import annotations

import math

from megatron_esft.errors import RunStopped


class NonFiniteGradNorm(Exception):
    """Raised inside the optimizer's step, after the gradients are prepared and before anything is updated."""

    def __init__(self, grad_norm: float):
        super().__init__(f"grad norm is {grad_norm}")
        self.grad_norm = grad_norm


def check_grad_norm_before_update(optimizer) -> None:
    """Make `optimizer.step()` raise `NonFiniteGradNorm` instead of updating with a NaN/Inf gradient.

    Megatron-Core's `ChainedOptimizer.step` (what `get_megatron_optimizer` returns) prepares the gradients, computes
    the global norm with `get_grad_norm`, and only then clips and updates; the check sits in that call, on this
    instance only."""
    from megatron.core.optimizer import ChainedOptimizer

    if not isinstance(optimizer, ChainedOptimizer):
        raise TypeError(f"expected Megatron-Core's ChainedOptimizer, got {type(optimizer).__name__}")
    compute = optimizer.get_grad_norm

    def get_grad_norm_checked():
        grad_norm = compute()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteGradNorm(grad_norm)
        return grad_norm

    optimizer.get_grad_norm = get_grad_norm_checked


def stopped(iteration: int, what: str, last_checkpoint: str | None) -> RunStopped:
    """The one-line error for a non-finite loss or gradient at `iteration` (1-based, the one being computed)."""
    kept = f"last checkpoint: {last_checkpoint}" if last_checkpoint else "this run saved no checkpoint"
    return RunStopped(f"iteration {iteration}: {what}; stopped before the optimizer step, so the weights were not "
                      f"updated and nothing of this iteration is saved ({kept}); lower --lr or --clip-grad, or pass "
                      "--no-check-for-nan-in-loss-and-grad to train on regardless")
