"""``non_finite``: a gradient holds NaN/Inf; the finding names the layer closest to the loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding

__all__ = ["NonFiniteDetector"]


class NonFiniteDetector(Detector):
    """Reports the onset of each episode of non-finite gradients (persistent ones only under a loss scaler).

    Counts are exact NaN/Inf elements; an infinite norm of finite elements is an overflow of the norm
    (exploding), not a non-finite gradient. The layer named is the one with the highest depth among those
    affected: the first the NaN/Inf reaches on its way back from the loss.
    """

    kind = "non_finite"
    needs_finite_gradients = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.run_length = 0
        self.first_step = -1

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        record, config = step.record, self.config
        grad = record.metrics["grad_l2"]
        counts = record.metrics.get("grad_nonfinite", np.zeros_like(grad))
        bad = np.flatnonzero(counts > 0)
        if bad.size == 0:
            self.run_length = 0
            return []
        self.run_length += 1
        if self.run_length == 1:
            self.first_step = record.step
        needed = config.scaled_non_finite_patience if step.loss_scaled else 1
        if self.run_length != needed:
            return []  # not yet persistent (loss scaler), or the same episode continues: onset only
        position = int(bad[np.argmax(record.depths[bad])])
        layer = record.layers[position]
        evidence: dict[str, Any] = {
            "nonfinite_elements": float(counts[position]),
            "layers_nonfinite": [record.layers[i] for i in bad[: config.max_layers_in_evidence]],
            "num_layers_nonfinite": int(bad.size),
            "global_grad_nonfinite": float(record.global_metrics.get("global_grad_nonfinite", np.nan)),
            "depth": int(record.depths[position]),
            "after_exploding": step.run.exploded,
            "consecutive_logged_steps": self.run_length,
            "loss_scaled": step.loss_scaled,
        }
        if step.loss is not None:
            evidence["loss"] = float(step.loss)
            evidence["loss_finite"] = math.isfinite(step.loss)
        message = (
            f"non-finite gradient at step {record.step}: {layer} (depth {int(record.depths[position])}) is the "
            f"first layer in backward order whose gradient holds NaN/Inf "
            f"({int(counts[position])} elements); {int(bad.size)} layer(s) affected"
            + (f"; non-finite on every logged step since step {self.first_step}" if self.run_length > 1 else "")
        )
        return [step.finding(self.kind, layer, self.first_step, message, evidence, [layer])]

    def state_dict(self) -> dict[str, Any]:
        """Streaks plus the current episode."""
        return {**super().state_dict(), "run": [self.run_length, self.first_step]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.run_length, self.first_step = (int(v) for v in state.get("run", (0, -1)))
