"""``loss_oscillating``: the training loss jumps widely without coming down."""

from __future__ import annotations

from typing import Any

from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.detectors.loss_curve import LossReading, level, median_update_ratio
from gradlight.diagnosis.finding import Finding
from gradlight.records import GLOBAL_LAYER

__all__ = ["LossOscillatingDetector"]


class LossOscillatingDetector(Detector):
    """The loss swings widely between logged steps and has not come down from its initial level.

    Holds at a logged step at least ``loss_min_steps`` optimizer steps after monitoring began, when the window of
    ``loss_window`` logged losses spans (10th to 90th percentile) at least ``loss_swing`` times its median, has no
    significant trend either way (``|z| < loss_trend_z``), its last half's median is less than ``loss_stuck_drop``
    below the initial level, and no exploding gradient was seen; reported after ``loss_patience`` such logged
    steps. Batch noise is as wide on a healthy run with small batches, but there the loss comes down on average;
    a loss that jumps and makes no progress is overshooting: each update lands on the other side of the minimum.
    """

    kind = "loss_oscillating"
    needs_finite_gradients = False
    needs_loss_reading = True

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config = self.config
        reading = step.loss_reading
        if reading is None:  # the step's loss was not added to the curve
            return []
        holds = (
            reading.full
            and not step.run.exploded
            and reading.span >= config.loss_min_steps
            and reading.progress < config.loss_stuck_drop
            and abs(reading.trend_z) < config.loss_trend_z
            and reading.swing >= config.loss_swing
        )
        count, since = self.streaks.one(GLOBAL_LAYER, holds, step.record.step)
        if count < config.loss_patience:
            return []
        return [self._finding(step, reading, since)]

    def _finding(self, step: StepContext, reading: LossReading, since: int) -> Finding:
        evidence: dict[str, Any] = {**reading.evidence(), "median_update_ratio": median_update_ratio(step)}
        message = (
            f"oscillating loss: over the last {reading.window} logged steps the training loss jumps between "
            f"{level(reading.low)} and {level(reading.high)} (10th-90th percentile, {reading.swing:.0%} of its median) "
            f"with no trend (z = {reading.trend_z:.1f}), and after {reading.span} steps it is no lower than at the "
            f"start ({level(reading.recent)} against {level(reading.initial)})"
        )
        return step.finding(self.kind, GLOBAL_LAYER, since, message, evidence, [GLOBAL_LAYER])
