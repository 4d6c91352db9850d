"""One plain PyTorch training loop with an observer attached, and the verdict on what the observer reported.

The loop is the one every ported program reduces to: forward, loss, backward, (the program's own gradient
edit, e.g. a flipped sign), optimizer step. An :class:`Observer` sees it at the points a training-diagnosis
library hooks into; :class:`GradlightObserver` is gradlight's :class:`~gradlight.GradientFlowRecorder`
(``log_every_n_steps=1``, activation taps on), :class:`Bare` is nothing at all (the overhead baseline).
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["Alarm", "Bare", "GradlightObserver", "Observer", "Result", "Setup", "judge", "train"]


@dataclass
class Setup:
    """A built program, ready to train.

    Attributes:
        model: The model.
        optimizer: Its optimizer.
        batches: The batches of one epoch; the loop cycles over them.
        loss: ``loss(model, batch) -> scalar tensor`` (regularisation included).
        steps: Optimizer steps.
        edit_gradients: The program's own change to the gradients after backward (``None``: none).
        on_step: Called with the step before its forward pass (faults with an onset).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[Any]
    loss: Callable[[nn.Module, Any], Tensor]
    steps: int
    edit_gradients: Callable[[nn.Module], None] | None = None
    on_step: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Alarm:
    """One thing an observer reported: its kind (the library's own word), the layer (``""``: none), the step."""

    kind: str
    layer: str = ""
    step: int | None = None
    severity: str = "warning"


class Observer(Protocol):
    """The points of the loop a diagnosis library hooks into."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before the first step."""

    def start_step(self, step: int) -> None:
        """Before the forward pass."""

    def after_backward(self, step: int, loss: Tensor) -> None:
        """After backward (and the program's gradient edit), before ``optimizer.step()``."""

    def end_step(self, step: int, loss: Tensor) -> None:
        """After ``optimizer.step()``."""

    def finish(self) -> list[Alarm]:
        """After the last step: everything reported."""


class Bare:
    """No observer: the loop alone (the overhead baseline)."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def start_step(self, step: int) -> None:
        return None

    def after_backward(self, step: int, loss: Tensor) -> None:
        return None

    def end_step(self, step: int, loss: Tensor) -> None:
        return None

    def finish(self) -> list[Alarm]:
        return []


class GradlightObserver:
    """gradlight's plain-loop recorder, every step logged, activation taps on, nothing written to disk."""

    def __init__(self) -> None:
        self.recorder: Any = None
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from gradlight import GradientFlowRecorder

        self.optimizer = optimizer
        self.recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, track_activations=True)

    def start_step(self, step: int) -> None:
        self.recorder.start_step(step)

    def after_backward(self, step: int, loss: Tensor) -> None:
        self.recorder.capture(step, self.optimizer)

    def end_step(self, step: int, loss: Tensor) -> None:
        self.recorder.end_step(loss.detach())

    def finish(self) -> list[Alarm]:
        self.recorder.close()
        return [Alarm(f.kind, f.layer, f.reported_step, f.severity) for f in self.recorder.findings]


@dataclass
class Result:
    """What one training run produced.

    Attributes:
        alarms: What the observer reported.
        losses: The loss of every step.
        step_seconds: Wall time of every step (forward to the end of the observer's ``end_step``).
        error: ``"Type: message (file:line)"`` if the run crashed (in the observer or the program).
    """

    alarms: list[Alarm] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_step(self) -> float:
        """Median step time in seconds (NaN without steps)."""
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = frames[-1] if frames else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {str(error)[:200]}{place}"


def train(setup: Setup, observer: Observer) -> Result:
    """Train ``setup`` with ``observer`` attached; a crash anywhere becomes the result's ``error``.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> batch = (torch.ones(4, 2), torch.zeros(4, 1))
        >>> setup = Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), [batch],
        ...               lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), steps=3)
        >>> result = train(setup, Bare())
        >>> len(result.losses), result.error
        (3, None)
    """
    result = Result()
    model, optimizer = setup.model, setup.optimizer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            observer.attach(model, optimizer)
            for step in range(setup.steps):
                start = time.perf_counter()
                if setup.on_step is not None:
                    setup.on_step(step)
                observer.start_step(step)
                loss = setup.loss(model, setup.batches[step % len(setup.batches)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if setup.edit_gradients is not None:
                    setup.edit_gradients(model)
                observer.after_backward(step, loss)
                optimizer.step()
                observer.end_step(step, loss)
                result.step_seconds.append(time.perf_counter() - start)
                result.losses.append(float(loss.detach()))
            result.alarms = observer.finish()
    except Exception as error:  # a crash is a row of the benchmark, not its end
        result.error = _describe(error)
    return result


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def judge(alarms: list[Alarm], kinds: Sequence[str], layers: Sequence[str]) -> tuple[Alarm | None, bool]:
    """The first warning of an accepted kind, and whether some accepted warning names an accepted layer.

    ``kinds`` and ``layers`` are fnmatch patterns; an empty ``kinds`` means a healthy program (returns the
    first warning of any kind: a false alarm). ``layers`` ``("*",)`` accepts any layer (and none).

    Example:
        >>> judge([Alarm("vanishing", "0", 3)], ("vanishing",), ("0",))
        (Alarm(kind='vanishing', layer='0', step=3, severity='warning'), True)
    """
    warnings_ = [a for a in alarms if a.severity == "warning"]
    if not kinds:
        return (warnings_[0] if warnings_ else None), False
    hits = [a for a in warnings_ if matches(a.kind, kinds)]
    placed = [a for a in hits if matches(a.layer, layers)]
    if placed:
        return placed[0], True
    return (hits[0] if hits else None), False
