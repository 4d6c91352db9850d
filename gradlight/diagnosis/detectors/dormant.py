"""``dormant``: a section of the model does not move while the rest trains and the loss still changes."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding, fmt

__all__ = ["DormantDetector"]


class DormantDetector(Detector):
    """A layer's parameters stand still while the rest of the model trains.

    Its ``update_ratio`` stays below ``dormant_update_ratio`` (and far below the typical layer's) for
    ``dormant_window`` logged steps while other layers move and the loss changes.

    When nothing moves at all, that is :class:`~gradlight.diagnosis.detectors.stalled.StalledDetector`'s
    finding (or a schedule at 0, or a converged run), not a dormant section.
    """

    kind = "dormant"

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.losses: deque[tuple[int, float]] = deque(maxlen=config.dormant_window)

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config, record = self.config, step.record
        if step.loss is not None and math.isfinite(step.loss):
            self.losses.append((record.step, float(step.loss)))
        update = record.metrics.get("update_ratio")
        if update is None:
            return []
        values = np.asarray(update, dtype=np.float64)
        finite = values[np.isfinite(values)]
        typical = float(np.median(finite)) if finite.size else float("nan")
        with np.errstate(invalid="ignore"):
            holds = (
                np.isfinite(values)
                & (values < config.dormant_update_ratio)
                & (values <= config.dormant_relative * typical)
            )
        for i in np.flatnonzero(holds):  # a branch behind a gain that is still near zero moves little by design
            scaled = step.gain_scale(record.layers[i])
            if scaled is not None and scaled.factor < config.gain_threshold:
                holds[i] = False
            elif step.output_starved(record.layers[i], config.vanishing_ratio):
                holds[i] = False  # an output branch that gets (almost) no loss gradient moves little
        streaks = self.streaks.advance(record.layers, holds, record.step)
        new = [
            (i, since)
            for i, (name, (count, since)) in enumerate(zip(record.layers, streaks))
            if count >= config.dormant_window and not step.is_reported(self.kind, name, "warning")
        ]
        if not new or not np.any(values >= config.dormant_update_ratio):
            return []  # nothing moves (LR schedule at 0, converged, stalled): not a dormant *section*
        since = min(s for _, s in new)
        losses = [value for loss_step, value in self.losses if loss_step >= since]
        change = float("nan")
        if len(losses) >= 2:
            change = (max(losses) - min(losses)) / max(abs(float(np.mean(losses))), 1e-12)
            if change < config.dormant_loss_change:
                return []  # the whole run is flat: converged, not a dormant section
        first, since = new[0]
        return [self._finding(step, first, since, change, len(losses) >= 2, [record.layers[i] for i, _ in new])]

    def _finding(
        self, step: StepContext, first: int, since: int, change: float, loss_known: bool, layers: list[str]
    ) -> Finding:
        config, record, reference = self.config, step.record, step.reference
        update = float(record.metrics["update_ratio"][first])
        grad = float(record.metrics["grad_l2"][first])
        layer = record.layers[first]
        grad_ratio = grad / reference.value if math.isfinite(reference.value) else float("nan")
        evidence: dict[str, Any] = {
            "update_ratio": update,
            "threshold": config.dormant_update_ratio,
            "window": config.dormant_window,
            "grad_l2": grad,
            "grad_ratio": grad_ratio,
            "starved": bool(grad_ratio < config.vanishing_ratio),
            "loss_change": change,
            "loss_known": loss_known,
        }
        if record.learning_rates is not None:
            evidence["learning_rate"] = float(record.learning_rates[first])
        loss_text = f"while the loss changed {change:.0%}" if math.isfinite(change) else "(loss unknown)"
        lr_text = f"; its learning rate is {fmt(evidence['learning_rate'])}" if "learning_rate" in evidence else ""
        message = (
            f"dormant layer: {layer}'s parameters moved {fmt(update)} of their norm per step "
            f"(below {fmt(config.dormant_update_ratio)}) for {config.dormant_window} logged steps since step "
            f"{since} {loss_text}; its gradient is {fmt(grad_ratio)} of the reference{lr_text}"
        )
        return step.finding(self.kind, layer, since, message, evidence, layers)

    def state_dict(self) -> dict[str, Any]:
        """Streaks plus the loss window."""
        return {**super().state_dict(), "losses": list(self.losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.losses = deque(((int(s), float(v)) for s, v in state.get("losses", [])), self.config.dormant_window)
