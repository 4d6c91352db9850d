"""Whether the gradient an optimizer steps with still holds its previous step's gradient (no ``zero_grad``).

Forgetting ``optimizer.zero_grad()`` makes every step's gradient the sum of all gradients so far: it keeps its
direction and grows, and the run diverges slowly. The probe proves it on one small parameter: at a recorded
step it keeps that parameter's gradient (``before``) and sums, with a tensor hook, every fresh gradient
backward passes add to it until the optimizer's next step. Then the gradient is either ``before + fresh``
(carried over: never zeroed), or ``fresh`` (zeroed). Anything else (another process averaged it, a scaler
rescaled it) proves nothing either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["CarryProbe"]


class CarryProbe:
    """One parameter's gradient at a recorded step, and the fresh gradients backward adds to it after it.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> (2 * w).sum().backward()
        >>> probe = CarryProbe.start([w])
        >>> (3 * w).sum().backward()  # no zero_grad in between: the gradient is 2 + 3
        >>> probe.carried()
        True
    """

    def __init__(self, param: Tensor, before: Tensor) -> None:
        self.param = param
        self.before = before
        self.fresh = torch.zeros_like(before)
        self.handle: RemovableHandle | None = param.register_hook(self._add)

    @classmethod
    def start(cls, params: Iterable[Tensor]) -> CarryProbe | None:
        """A probe on the smallest dense floating-point parameter that has a gradient now, or ``None``."""
        best: Tensor | None = None
        for param in params:
            grad = param.grad
            if grad is None or grad.is_sparse or not grad.is_floating_point() or type(grad) is not Tensor:
                continue
            if best is None or param.numel() < best.numel():
                best = param
        if best is None or best.grad is None:
            return None
        try:
            return cls(best, best.grad.detach().clone())
        except Exception:  # e.g. a parameter that takes no hooks: no probe, training goes on
            return None

    def _add(self, grad: Tensor) -> None:
        if grad.shape != self.fresh.shape:  # a flat or sharded gradient (FSDP): proves nothing, never raises
            self.fresh.zero_()
            self.stop()
            return
        self.fresh += grad.detach()

    def carried(self) -> bool | None:
        """``True`` if the gradient is the previous one plus the fresh ones, ``False`` if only the fresh ones.

        ``None`` when it is neither (or no backward reached the parameter). Removes the hook.
        """
        self.stop()
        try:  # a check that fails (an odd gradient type, a device error) proves nothing; it never stops training
            return self._compare()
        except Exception:
            return None

    def _compare(self) -> bool | None:
        grad = self.param.grad
        if grad is None or grad.shape != self.before.shape:
            return None
        # One copy to the host (a small parameter's three tensors), then numpy: on CPU a dozen torch calls on a
        # tensor of a few elements cost their dispatch, on an accelerator each would synchronise.
        current, before, fresh = torch.stack([grad.detach(), self.before, self.fresh]).double().cpu().numpy()
        if not fresh.any():
            return None
        scale = float(np.abs(before).max()) or 1.0
        if not (math.isfinite(scale) and np.isfinite(current).all() and np.isfinite(fresh).all()):
            return None  # NaN/Inf: the non-finite rule speaks for this step
        atol = 1e-6 * scale  # as allclose(rtol=1e-3, atol=atol), whose generality costs tens of microseconds here
        with_before = _close(current, before + fresh, atol)
        fresh_only = _close(current, fresh, atol)
        if with_before == fresh_only:
            return None
        return with_before

    def stop(self) -> None:
        """Remove the hook."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _close(actual: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    """``allclose(actual, expected, rtol=1e-3, atol=atol)`` for finite arrays."""
    return bool((np.abs(actual - expected) <= atol + 1e-3 * np.abs(expected)).all())
