"""Automatic mixed precision: the loss scale a ``torch.amp.GradScaler`` put on the gradients.

Under fp16 AMP the backward pass runs on the loss times the scaler's scale. The gradients carry it until
``scaler.unscale_(optimizer)``; the backward signal tapped during the backward pass carries it for good.
:func:`backward_scale_of` is the scale backward ran with, :func:`grad_scale_left` what the gradients still
carry. The recorder divides them out (``capture(grad_scale=..., backward_scale=...)``).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from gradlight.wrappers import unwrap_optimizer

__all__ = ["backward_scale_of", "grad_scale_left", "step_scales"]


def backward_scale_of(scaler: torch.amp.GradScaler | None) -> float:
    """The loss scale backward passes run with under ``scaler`` (1.0 without one, or when it is disabled).

    Read it before ``scaler.update()``, which may change the scale for the next step.

    Example:
        >>> backward_scale_of(torch.amp.GradScaler("cpu", init_scale=1024.0)), backward_scale_of(None)
        (1024.0, 1.0)
    """
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def grad_scale_left(scaler: torch.amp.GradScaler | None, optimizer: Optimizer) -> float:
    """The AMP loss scale ``optimizer``'s gradients still carry: 1.0 once ``scaler.unscale_(optimizer)`` ran.

    Args:
        scaler: A ``torch.amp.GradScaler`` (or ``None``: no scaling).
        optimizer: The optimizer about to step.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        >>> scaler.scale(net(torch.ones(1, 2)).sum()).backward()
        >>> grad_scale_left(scaler, opt)
        1024.0
        >>> scaler.unscale_(opt)
        >>> grad_scale_left(scaler, opt)
        1.0
    """
    if scaler is None or not scaler.is_enabled():
        return 1.0
    from torch.amp.grad_scaler import OptState

    # GradScaler keeps no public "unscaled?" flag: its per-optimizer stage is the only record of it.
    state = scaler._per_optimizer_states.get(id(unwrap_optimizer(optimizer)))
    if state is not None and state.get("stage") is not OptState.READY:
        return 1.0
    return backward_scale_of(scaler)


def step_scales(
    scaler: torch.amp.GradScaler | None,
    owner: Optimizer | None,
    grad_scale: float | None,
    backward_scale: float | None,
) -> tuple[float, float]:
    """The loss scale the gradients still carry, and the one the backward passes ran with (fp16 AMP)."""
    if grad_scale is None:
        grad_scale = grad_scale_left(scaler, owner) if scaler is not None and owner is not None else 1.0
    if backward_scale is None:
        backward_scale = backward_scale_of(scaler) if scaler is not None else grad_scale
    return float(grad_scale), float(backward_scale)
