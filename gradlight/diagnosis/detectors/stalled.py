"""``stalled``: no layer's weights move measurably for a window while the learning rate is not 0."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding, fmt
from gradlight.records import GLOBAL_LAYER

__all__ = ["StalledDetector"]


class StalledDetector(Detector):
    """The weights as a whole move less than ``stalled_update_ratio`` of their norm for ``stalled_window`` steps.

    The measure is the L2 of all layers' updates over the L2 of all their parameters (from the record's
    ``update_ratio`` and ``param_l2``): a near-zero gain, whose own ratio is large for any update, does not
    hide a stall of every other weight.

    Not a stall: a learning rate of 0, or one at most ``stalled_lr_fraction`` of the largest seen in the run
    (a schedule's annealed end); a step without update ratios (all NaN: ``track_update_ratio=False``); a step whose
    learning rate is unknown (the capture's owner was not an optimizer), since a schedule at 0 looks the same.
    """

    kind = "stalled"

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config, record, run = self.config, step.record, step.run
        update = record.metrics.get("update_ratio")  # a tracker's record has it (NaN: untracked); a replay may not
        if update is None:
            return []
        values = np.asarray(update, dtype=np.float64)
        weights = np.asarray(record.metrics.get("param_l2", np.ones_like(values)), dtype=np.float64)
        keep = np.isfinite(values) & np.isfinite(weights)
        finite = values[keep]
        # the weights as a whole: sum of the layers' update L2 over their parameter L2 (a near-zero gain's tiny
        # norm makes its own ratio large for an update that is nothing next to the other weights)
        total = float(np.sqrt(((finite * weights[keep]) ** 2).sum()) / max(np.sqrt((weights[keep] ** 2).sum()), 1e-30))
        rate = record.max_learning_rate
        if rate is not None:
            run.peak_learning_rate = max(run.peak_learning_rate, rate)
        moving_rate = rate is not None and rate > config.stalled_lr_fraction * run.peak_learning_rate
        holds = moving_rate and finite.size > 0 and total < config.stalled_update_ratio
        count, since = self.streaks.one(GLOBAL_LAYER, bool(holds), record.step)
        if count < config.stalled_window:
            return []
        largest = float(finite.max())
        evidence: dict[str, Any] = {
            "update_ratio": total,
            "max_update_ratio": largest,
            "threshold": config.stalled_update_ratio,
            "window": config.stalled_window,
            "learning_rate": rate,
            "peak_learning_rate": run.peak_learning_rate,
            "loss_scaled": step.loss_scaled,
            "global_grad_l2": float(record.global_metrics.get("global_grad_l2", np.nan)),
        }
        lr_text = f"the learning rate is {fmt(float(rate or 0.0))}"
        message = (
            f"training has stalled: the weights moved {fmt(total)} of their norm per step "
            f"(below {fmt(config.stalled_update_ratio)}) for {config.stalled_window} logged steps since step "
            f"{since}, while {lr_text}"
        )
        return [step.finding(self.kind, GLOBAL_LAYER, since, message, evidence, [GLOBAL_LAYER])]
