"""``non_finite``: a gradient holds NaN/Inf; the finding names the layer closest to the loss.

When the forward pass of the step was tapped it also names the first module whose forward output held NaN/Inf
(where it was born).
"""

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

    Where it was born: with the forward-origin taps (``DiagnosisConfig.forward_origin``, on logged steps) the
    finding names the first module in forward order whose output held NaN/Inf on the episode's first step
    (``forward_origin``), or says the forward pass was finite (``forward_finite``: born in backward). Modules
    whose outputs are non-finite on steps with finite gradients and loss (an additive ``-inf`` attention mask)
    are non-finite by design and skipped. Without those taps, an activation site with non-finite outputs
    (activation taps) is named instead (``activation_nonfinite``).
    """

    kind = "non_finite"
    needs_finite_gradients = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.run_length = 0
        self.first_step = -1
        self.origin: dict[str, Any] = {}  # where the current episode was born (its first step)
        self.by_design: set[str] = set()  # modules with non-finite outputs on healthy steps

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        record, config = step.record, self.config
        grad = record.metrics["grad_l2"]
        counts = record.metrics.get("grad_nonfinite", np.zeros_like(grad))
        bad = np.flatnonzero(counts > 0)
        if bad.size == 0:
            self.run_length = 0
            if step.nonfinite_modules and (step.loss is None or math.isfinite(step.loss)):
                self.by_design.update(step.nonfinite_modules)
            return []
        self.run_length += 1
        if self.run_length == 1:
            self.first_step = record.step
            self.origin = self._origin(step)
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
            **self.origin,
        }
        if step.loss is not None:
            evidence["loss"] = float(step.loss)
            evidence["loss_finite"] = math.isfinite(step.loss)
        message = (
            f"non-finite gradient at step {record.step}: {layer} (depth {int(record.depths[position])}) is the "
            f"first layer in backward order whose gradient holds NaN/Inf "
            f"({int(counts[position])} elements); {int(bad.size)} layer(s) affected"
            + (f"; non-finite on every logged step since step {self.first_step}" if self.run_length > 1 else "")
            + _origin_text(self.origin)
        )
        return [step.finding(self.kind, layer, self.first_step, message, evidence, [layer])]

    def _origin(self, step: StepContext) -> dict[str, Any]:
        """Where the episode starting at ``step`` was born in forward, as evidence (``{}`` if not tapped)."""
        modules = step.nonfinite_modules
        if modules is not None:
            born = [name for name in modules if name not in self.by_design]
            if born:
                return {"forward_origin": born[0], "forward_nonfinite": born[: self.config.max_layers_in_evidence]}
            return {"forward_finite": True}
        acts = step.activations
        if acts is not None and acts.nonfinite.size and bool(acts.nonfinite.any()):
            return {"activation_nonfinite": acts.sites[int(np.argmax(acts.nonfinite))]}
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Streaks plus the current episode."""
        return {
            **super().state_dict(),
            "run": [self.run_length, self.first_step],
            "origin": dict(self.origin),
            "by_design": sorted(self.by_design),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.run_length, self.first_step = (int(v) for v in state.get("run", (0, -1)))
        self.origin = dict(state.get("origin", {}))
        self.by_design = {str(name) for name in state.get("by_design", [])}


def _origin_text(origin: Mapping[str, Any]) -> str:
    """The message's clause on where the NaN/Inf was born."""
    if "forward_origin" in origin:
        return (
            f"; born in forward: {origin['forward_origin']} is the first module whose output held NaN/Inf "
            f"({len(origin['forward_nonfinite'])} module(s) in all)"
        )
    if origin.get("forward_finite"):
        return "; every module's forward output was finite: it was born in backward"
    if "activation_nonfinite" in origin:
        return f"; the first activation whose outputs held NaN/Inf in forward: {origin['activation_nonfinite']}"
    return ""
