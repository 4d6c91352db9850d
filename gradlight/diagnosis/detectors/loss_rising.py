"""``loss_rising``: the training loss climbs steadily above its initial level while gradients stay ordinary."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.detectors.loss_curve import LossReading, level, median_update_ratio
from gradlight.diagnosis.finding import Finding
from gradlight.records import GLOBAL_LAYER

__all__ = ["LossRisingDetector"]


class LossRisingDetector(Detector):
    """The loss rises: a consistent upward trend over the window, ending well above where the run started.

    Holds at a logged step when the last ``loss_window`` logged losses trend up (Mann-Kendall z at least
    ``loss_trend_z``) and still rise in the window's last half (its own statistic above 0), the median of that
    half is above the first's, above every loss of the
    initial steps and at least ``loss_rise`` (a fraction of ``|initial|``) above the initial level, and no
    exploding gradient was seen (the ``exploding`` finding speaks for a blow-up); reported after
    ``loss_patience`` such logged steps. A bump after a warm-up overshoot or a cosine restart starts below the
    initial level and comes back down; a climb above the level of the untrained model is an optimizer walking
    uphill (a flipped loss sign, ``maximize=True``, an update that adds ``lr * grad``) or a learning rate so
    large that every step lands higher. A window holding a gradient spike (a step whose global gradient L2 is
    ``exploding_factor`` times the window's median: one outlier batch) is not judged: that batch sets the model
    back and Adam's moments carry its step on for a few more, so the loss climbs for ~10 steps and recovers
    (measured on an LSTM regressor: 0.0002 before, 0.20 eight steps after a mislabelled batch, then falling).
    """

    kind = "loss_rising"
    needs_finite_gradients = False
    needs_loss_reading = True

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.norms: deque[float] = deque(maxlen=config.loss_window or 1)

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config = self.config
        reading = step.loss_reading
        if reading is None:  # the step's loss was not added to the curve
            return []
        norm = float(step.record.global_metrics.get("global_grad_l2", math.nan))
        self.norms.append(norm if math.isfinite(norm) else 0.0)
        norms = np.asarray(self.norms)
        median = float(np.median(norms))
        spike = norms.size > 2 and median > 0 and float(norms.max()) >= config.exploding_factor * median
        holds = (
            reading.full
            and not step.run.exploded
            and not spike
            and reading.trend_z >= config.loss_trend_z
            and reading.recent_z > 0
            and reading.recent > max(reading.first, reading.initial_high)
            and reading.progress <= -config.loss_rise
        )
        count, since = self.streaks.one(GLOBAL_LAYER, holds, step.record.step)
        if count < config.loss_patience:
            return []
        return [self._finding(step, reading, since)]

    def _finding(self, step: StepContext, reading: LossReading, since: int) -> Finding:
        evidence: dict[str, Any] = {**reading.evidence(), "median_update_ratio": median_update_ratio(step)}
        maximize = step.record.global_metrics.get("optimizer_maximize")
        if maximize is not None:
            evidence["maximize"] = bool(maximize)
        message = (
            f"rising loss: the training loss climbed from {level(reading.initial)} at the start to "
            f"{level(reading.recent)} (median of the last {max(1, reading.window // 2)} logged steps, "
            f"{-reading.progress:.0%} above), a steady rise over the last {reading.window} logged steps (trend z = "
            f"{reading.trend_z:.1f}) since step {since}, while the gradients show no blow-up"
        )
        return step.finding(self.kind, GLOBAL_LAYER, since, message, evidence, [GLOBAL_LAYER])

    def state_dict(self) -> dict[str, Any]:
        """Streaks plus the global gradient norms of the window's steps."""
        return {**super().state_dict(), "norms": list(self.norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.norms = deque((float(v) for v in state.get("norms", [])), maxlen=self.config.loss_window or 1)
