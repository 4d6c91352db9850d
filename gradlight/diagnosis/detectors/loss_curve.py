"""The training loss as evidence: the curve the three loss detectors read, and its statistics.

A :class:`LossCurve` keeps the run's *initial level* (the median loss of the logged steps within the first
``loss_initial_steps`` optimizer steps after monitoring began) and the last ``loss_window`` logged losses. From
them it measures, noise-aware:

* ``trend_z``: the Mann-Kendall statistic of the window (the sign of every pair of later-minus-earlier losses,
  summed, over its standard deviation under "no trend"): it counts how consistently the loss moves one way,
  whatever the size of each batch's noise, so a few outlier batches do not make a trend.
* ``recent``: the median of the window's last half, compared to the initial level in units of ``|initial|``
  (``progress``: how far the loss came down since the start; negative when it went up).
* ``swing``: the window's inter-decile range over its median level, how widely the loss jumps between logged
  steps.

The three loss findings (``loss_rising``, ``loss_oscillating``, ``loss_plateau``) are disjoint readings of
these numbers. The engine (:class:`~gradlight.diagnosis.GradientDiagnosis`) keeps one curve per optimizer stream
(a few dozen floats, in its state), adds each logged step's loss to it once, reads it once, and hands the
:class:`LossReading` to the detectors as :attr:`StepContext.loss_reading
<gradlight.diagnosis.detectors.base.StepContext>`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradlight.diagnosis.config import DiagnosisConfig

if TYPE_CHECKING:  # base.py imports this module (StepContext carries a LossReading)
    from gradlight.diagnosis.detectors.base import StepContext

__all__ = ["LossCurve", "LossReading", "level", "mann_kendall_z", "median_update_ratio"]


def level(value: float) -> str:
    """A loss value as the messages print it (four significant digits).

    Example:
        >>> level(2.302585), level(1.5e-05)
        ('2.303', '1.5e-05')
    """
    return f"{value:.4g}"


def mann_kendall_z(values: np.ndarray) -> float:
    """The Mann-Kendall trend statistic of ``values`` (positive: rising), continuity-corrected, ties ignored.

    Example:
        >>> round(mann_kendall_z(np.arange(10.0)), 2), mann_kendall_z(np.ones(10))
        (3.94, 0.0)
    """
    n = values.size
    if n < 3:
        return 0.0
    diffs = values[None, :] - values[:, None]
    s = float(np.sign(diffs[np.triu_indices(n, k=1)]).sum())
    variance = n * (n - 1) * (2 * n + 5) / 18.0
    if s == 0:
        return 0.0
    return (s - math.copysign(1.0, s)) / math.sqrt(variance)


def median_update_ratio(step: StepContext) -> float | None:
    """The median layer's ``update_ratio`` at ``step`` (``None`` when it is not recorded or not finite)."""
    update = step.record.metrics.get("update_ratio")
    if update is None:
        return None
    values = np.asarray(update, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


@dataclass(frozen=True)
class LossReading:
    """The curve's numbers at one logged step (see the module docstring)."""

    initial: float
    initial_high: float  # the largest loss of the initial steps
    recent: float
    progress: float  # (initial - recent) / |initial|: > 0 the loss came down
    trend_z: float
    recent_z: float  # the trend statistic of the window's last half alone
    swing: float  # inter-decile range of the window over |its median|
    span: int  # optimizer steps since monitoring began
    window: int  # logged losses in the window
    first: float  # the window's first-half median
    low: float  # the window's 10th percentile
    high: float  # the window's 90th percentile
    full: bool  # the window holds ``loss_window`` losses

    def evidence(self) -> dict[str, Any]:
        """The reading as finding evidence."""
        return {
            "loss_initial": self.initial,
            "loss_recent": self.recent,
            "loss_progress": self.progress,
            "loss_trend_z": self.trend_z,
            "loss_swing": self.swing,
            "loss_low": self.low,
            "loss_high": self.high,
            "loss_window": self.window,
            "steps_since_start": self.span,
        }


class LossCurve:
    """The initial level and the last ``loss_window`` logged losses of a run.

    Example:
        >>> curve = LossCurve(DiagnosisConfig(loss_window=4, loss_initial_steps=2))
        >>> for step, loss in enumerate([2.3, 2.3, 2.5, 2.8, 3.1, 3.5]):
        ...     _ = curve.add(step, loss)
        >>> reading = curve.update(6, 3.9)  # add a logged step's loss and read the curve
        >>> reading.initial, reading.initial_high, reading.recent, round(reading.progress, 2), reading.full
        (2.3, 2.3, 3.7, -0.61, True)
        >>> curve.update(7, float("nan")) is None  # not finite: not added, nothing to read
        True
    """

    def __init__(self, config: DiagnosisConfig) -> None:
        self.config = config
        self.start: int | None = None
        self.initial: list[float] = []
        self.window: deque[float] = deque(maxlen=config.loss_window)
        self.last_step = -1

    def add(self, step: int, loss: float | None) -> bool:
        """Add a logged step's loss; ``False`` (and nothing added) if it is unknown or not finite."""
        if loss is None or not math.isfinite(loss):
            return False
        if self.start is None:
            self.start = step
        if step < self.start + self.config.loss_initial_steps:
            self.initial.append(float(loss))
        self.window.append(float(loss))
        self.last_step = step
        return True

    @property
    def full(self) -> bool:
        """Whether the window holds ``loss_window`` losses."""
        window = self.config.loss_window
        return window is not None and len(self.window) >= window

    def update(self, step: int, loss: float | None) -> LossReading | None:
        """Add a logged step's loss and read the curve; ``None`` (nothing added) if it is unknown or not finite."""
        return self.read() if self.add(step, loss) else None

    def read(self) -> LossReading | None:
        """The curve's numbers (see the module docstring), or ``None`` before any loss of the initial steps."""
        if not self.initial or self.start is None:
            return None
        values = np.asarray(self.window, dtype=np.float64)
        initial = float(np.median(self.initial))
        half = max(1, values.size // 2)
        recent = float(np.median(values[-half:]))
        scale = max(abs(initial), 1e-12)
        level = max(abs(float(np.median(values))), 1e-12)
        low, high = (float(v) for v in np.percentile(values, [10, 90]))
        return LossReading(
            initial=initial,
            initial_high=float(max(self.initial)),
            recent=recent,
            progress=(initial - recent) / scale,
            trend_z=mann_kendall_z(values),
            recent_z=mann_kendall_z(values[-half:]),
            swing=(high - low) / level,
            span=self.last_step - self.start,
            window=int(values.size),
            first=float(np.median(values[:half])),
            low=low,
            high=high,
            full=self.full,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain values."""
        return {"start": self.start, "initial": list(self.initial), "window": list(self.window), "last": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        start = state.get("start")
        self.start = None if start is None else int(start)
        self.initial = [float(v) for v in state.get("initial", [])]
        self.window = deque((float(v) for v in state.get("window", [])), maxlen=self.config.loss_window)
        self.last_step = int(state.get("last", -1))
