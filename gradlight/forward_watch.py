"""Which of a few modules run in a step's forward pass: the evidence behind a ``no_gradient`` finding's cause.

A layer without a gradient either did not run in forward (LayerDrop, an early exit, an expert nobody was
routed to, a module never called) or ran but its output does not reach the loss (a ``.detach()``). The
recorder watches only the modules of layers that had no gradient at their last logged step, so a healthy
model carries no hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle

from gradlight.layers import clean_parameter_name

__all__ = ["ForwardWatch"]


class ForwardWatch:
    """Forward pre-hooks on the named modules that note which of them ran since the last :meth:`reset`.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> watch = ForwardWatch(net, ["0"])
        >>> _ = net[2](torch.zeros(1, 2))
        >>> sorted(watch.ran), sorted(watch.watched)
        ([], ['0'])
        >>> _ = net(torch.zeros(1, 2))
        >>> sorted(watch.ran)
        ['0']
        >>> watch.remove()
    """

    def __init__(self, model: nn.Module, modules: Iterable[str]) -> None:
        wanted = set(modules)
        self.ran: set[str] = set()
        self.watched: set[str] = set()
        self._handles: list[RemovableHandle] = []
        for raw, module in model.named_modules():
            name = clean_parameter_name(raw)
            if name in wanted:
                self.watched.add(name)
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            self.ran.add(name)

        return hook

    def reset(self) -> None:
        """Forget what ran (call where a step's forward passes begin)."""
        self.ran.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
