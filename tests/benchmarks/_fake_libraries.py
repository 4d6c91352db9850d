"""Test doubles for the competitor harness (``benchmarks/competitors.py``): not stand-ins for real packages.

Each is an observer with the harness's protocol that behaves in one extreme way, so the harness's handling
of that behaviour can be asserted: one alarms on every run, one raises inside the training loop, one kills
its own process.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from benchmarks.buggy.runner import Alarm


class AlwaysAlarms:
    """Reports an alarm on the first layer of every run."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.first = next(name for name, _ in model.named_modules() if name)

    def start_step(self, step: int) -> None:
        return None

    def after_backward(self, step: int, loss: Tensor) -> None:
        return None

    def end_step(self, step: int, loss: Tensor) -> None:
        return None

    def finish(self) -> list[Alarm]:
        return [Alarm("always", self.first, 0)]


class Crashes(AlwaysAlarms):
    """Raises inside the loop at the third step (as a library's hook would)."""

    def end_step(self, step: int, loss: Tensor) -> None:
        if step == 2:
            raise RuntimeError("fake library failed in its hook")


class KillsItsProcess(AlwaysAlarms):
    """Ends its worker process abruptly when attached."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        os._exit(3)
