"""``loss_plateau``: the training loss stays at its initial level while the weights move."""

from __future__ import annotations

import math
from typing import Any

from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.detectors.loss_curve import LossReading, level, median_update_ratio
from gradlight.diagnosis.finding import Finding, fmt
from gradlight.records import GLOBAL_LAYER

__all__ = ["LossPlateauDetector", "chance_classes"]

#: Class counts whose uniform-guess cross-entropy ``ln(k)`` a plateau is compared to: above ~10 the values
#: ``ln(k)`` lie so close together that any loss matches one of them.
_CHANCE_CLASSES = range(2, 11)


def chance_classes(level: float, tolerance: float = 0.01) -> int | None:
    """The class count ``k`` whose chance-level cross-entropy ``ln(k)`` is within ``tolerance`` (relative) of ``level``.

    Example:
        >>> chance_classes(2.3026), chance_classes(0.6931), chance_classes(1.9)
        (10, 2, None)
    """
    for k in _CHANCE_CLASSES:
        if abs(level - math.log(k)) <= tolerance * math.log(k):
            return k
    return None


class LossPlateauDetector(Detector):
    """The loss has not come down from its initial level although the weights move.

    Holds at a logged step at least ``loss_min_steps`` optimizer steps after monitoring began, when the median
    of the last half of the ``loss_window`` logged losses is less than ``loss_stuck_drop`` (a fraction of
    ``|initial|``) below the initial level and not ``loss_rise`` above it, the window has no significant trend
    either way (``|z| < loss_trend_z``), it swings less than ``loss_swing`` (a wide swing is ``loss_oscillating``)
    and the weights move (the median layer's ``update_ratio`` is at least ``stalled_update_ratio``: otherwise
    ``stalled`` speaks). Reported after ``loss_patience`` such logged steps. Healthy training, even on one sample
    per batch or behind a warm-up, brings the loss below the untrained model's within a hundred steps; a loss at
    its initial value (the chance level of a classifier) means the model learns nothing from its inputs. When
    that level is ``ln(k)`` for ``k <= 10`` the finding says so (``chance_classes``): the cross-entropy of a
    uniform guess over ``k`` classes. It is evidence only, not a trigger: a healthy loss passing ``ln(4)`` on its
    way down is not at chance. A model already trained when monitoring begins also keeps its loss at its
    initial level; the cause text names that case too.
    """

    kind = "loss_plateau"
    needs_finite_gradients = False
    needs_loss_reading = True

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config = self.config
        reading = step.loss_reading
        if reading is None:  # the step's loss was not added to the curve
            return []
        update = median_update_ratio(step)
        holds = (
            reading.full
            and reading.span >= config.loss_min_steps
            and -config.loss_rise < reading.progress < config.loss_stuck_drop
            and abs(reading.trend_z) < config.loss_trend_z
            and reading.swing < config.loss_swing
            and (update is None or update >= config.stalled_update_ratio)
        )
        count, since = self.streaks.one(GLOBAL_LAYER, holds, step.record.step)
        if count < config.loss_patience:
            return []
        return [self._finding(step, reading, since, update)]

    def _finding(self, step: StepContext, reading: LossReading, since: int, update: float | None) -> Finding:
        evidence: dict[str, Any] = {**reading.evidence(), "median_update_ratio": update}
        classes = chance_classes(reading.recent)
        if classes is not None:
            evidence["chance_classes"] = classes
        chance = f" (ln {classes}: the cross-entropy of a uniform guess over {classes} classes)" if classes else ""
        moves = f"; the weights move {fmt(update)} of their norm per step" if update is not None else ""
        message = (
            f"loss plateau: the training loss is still at its initial level after {reading.span} steps: "
            f"{level(reading.recent)} (median of the last {max(1, reading.window // 2)} logged steps) against "
            f"{level(reading.initial)} at the start{chance}, with no trend (z = {reading.trend_z:.1f}) and swings of "
            f"{reading.swing:.0%}{moves}"
        )
        return step.finding(self.kind, GLOBAL_LAYER, since, message, evidence, [GLOBAL_LAYER])
