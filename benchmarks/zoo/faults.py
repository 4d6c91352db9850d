"""Ways to break a real model at a known layer and a known optimizer step.

Each fault is a frozen dataclass whose :meth:`Fault.apply` edits a built model in place (weights, hooks,
extra modules) before training. Faults that start at a step read it from a :class:`Clock` that the runner
advances to ``trainer.global_step`` at the start of every batch. Module names are as in
``model.named_modules()`` of the bare model (the runner prefixes its own attribute name when scoring).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Clock", "DetachOutput", "Fault", "InjectNonFinite", "ScaleParameters", "SetParameters", "UnusedModule"]


class Clock:
    """The current optimizer step, for faults that start at a step.

    Example:
        >>> clock = Clock()
        >>> clock.step = 3
        >>> clock.step
        3
    """

    def __init__(self) -> None:
        self.step = 0


class Fault:
    """Something wrong done to a model on purpose; ``describe`` says what, for the report."""

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """Break ``model`` in place."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the table."""
        raise NotImplementedError


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"no module named {name!r} in {type(model).__name__}; e.g. {list(modules)[1:6]}")
    return modules[name]


def _matching(model: nn.Module, pattern: str, module_class: str | None) -> list[nn.Parameter]:
    """Parameters whose full name matches ``pattern``, owned by a module of class ``module_class`` if given."""
    matched = [
        parameter
        for owner_name, owner in model.named_modules()
        if module_class is None or type(owner).__name__ == module_class
        for name, parameter in owner.named_parameters(prefix=owner_name, recurse=False)
        if fnmatch.fnmatchcase(name, pattern)
    ]
    if not matched:
        where = f" in a {module_class}" if module_class else ""
        raise ValueError(f"no parameter matches {pattern!r}{where}")
    return matched


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor of a {type(output).__name__}")


@dataclass(frozen=True)
class DetachOutput(Fault):
    """A forward hook returns ``output.detach()``: every layer before ``module`` gets no gradient.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> DetachOutput("0").apply(net, Clock())
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> net[0].weight.grad is None, net[1].weight.grad is not None
        (True, True)
    """

    module: str

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """See :meth:`Fault.apply`."""

        def detach(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, Tensor):
                return output.detach()
            return type(output)(o.detach() if isinstance(o, Tensor) else o for o in output)

        _module(model, self.module).register_forward_hook(detach)

    def describe(self) -> str:
        """See :meth:`Fault.describe`."""
        return f"forward hook returns {self.module}'s output .detach()ed"


@dataclass(frozen=True)
class InjectNonFinite(Fault):
    """At optimizer step ``step``, the gradient arriving at ``module``'s output is replaced by ``value``.

    A tensor hook on the output (registered by a forward hook on the micro-batches of that step) fills the
    backward signal with NaN (or Inf): ``module``'s own parameters and every layer before it get non-finite
    gradients, the layers after it stay finite.

    Example:
        >>> net, clock = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), Clock()
        >>> InjectNonFinite("0", step=0).apply(net, clock)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> bool(net[0].weight.grad.isnan().all()), bool(net[1].weight.grad.isfinite().all())
        (True, True)
    """

    module: str
    step: int
    value: float = math.nan

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """See :meth:`Fault.apply`."""

        def inject(module: nn.Module, args: Any, output: Any) -> None:
            if clock.step == self.step and torch.is_grad_enabled():
                _first_tensor(output).register_hook(lambda grad: torch.full_like(grad, self.value))

        _module(model, self.module).register_forward_hook(inject)

    def describe(self) -> str:
        """See :meth:`Fault.describe`."""
        return f"{self.value} injected into the gradient of {self.module}'s output at step {self.step}"


@dataclass(frozen=True)
class UnusedModule(Fault):
    """Registers ``nn.Linear(features, features)`` as ``name``: it goes to the optimizer, ``forward`` never calls it.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> UnusedModule("aux", 2).apply(net, Clock())
        >>> [name for name, _ in net.named_parameters()]
        ['0.weight', '0.bias', 'aux.weight', 'aux.bias']
    """

    name: str
    features: int

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """See :meth:`Fault.apply`."""
        parent, _, leaf = self.name.rpartition(".")
        _module(model, parent).add_module(leaf, nn.Linear(self.features, self.features))

    def describe(self) -> str:
        """See :meth:`Fault.describe`."""
        return f"{self.name} = nn.Linear built and optimised, never called in forward"


@dataclass(frozen=True)
class SetParameters(Fault):
    """Sets every parameter whose name matches ``pattern`` (fnmatch) to ``value``.

    ``module_class`` restricts it to parameters owned by modules of that class name (``"BatchNorm2d"``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> SetParameters("0.bias", -5.0).apply(net, Clock())
        >>> net[0].bias.tolist()
        [-5.0, -5.0]
    """

    pattern: str
    value: float
    module_class: str | None = None

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """See :meth:`Fault.apply`."""
        with torch.no_grad():
            for parameter in _matching(model, self.pattern, self.module_class):
                parameter.fill_(self.value)

    def describe(self) -> str:
        """See :meth:`Fault.describe`."""
        owner = f" ({self.module_class})" if self.module_class else ""
        return f"{self.pattern}{owner} = {self.value:g}"


@dataclass(frozen=True)
class ScaleParameters(Fault):
    """Multiplies every parameter whose name matches ``pattern`` (fnmatch) by ``factor``.

    ``module_class`` restricts it to parameters owned by modules of that class name (``"BatchNorm2d"``).

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> ScaleParameters("*.weight", 4.0).apply(net, Clock())
        >>> net[0].weight.tolist()
        [4.0, 4.0]
    """

    pattern: str
    factor: float
    module_class: str | None = None

    def apply(self, model: nn.Module, clock: Clock) -> None:
        """See :meth:`Fault.apply`."""
        with torch.no_grad():
            for parameter in _matching(model, self.pattern, self.module_class):
                parameter.mul_(self.factor)

    def describe(self) -> str:
        """See :meth:`Fault.describe`."""
        owner = f" ({self.module_class})" if self.module_class else ""
        return f"{self.pattern}{owner} x {self.factor:g}"
