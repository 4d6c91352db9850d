"""``no_gradient``: trainable parameters handed to the optimizer that get no gradient at all."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding

__all__ = ["NoGradientDetector"]


class NoGradientDetector(Detector):
    """Layers in the optimizer that receive no gradient.

    A layer whose parameters have ``.grad is None`` (or an exactly zero gradient) for ``no_gradient_patience``
    logged steps in a row is reported.

    Intentionally frozen parameters (``requires_grad=False``) are never monitored, so never reported. The
    cause is told apart with the forward order the tracker discovered: a module that never ran, one that ran
    but whose output does not reach the loss through autograd, or one whose gradient is exactly zero.
    """

    kind = "no_gradient"
    needs_finite_gradients = False

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        config, record = self.config, step.record
        missing = list(record.missing)
        zero = [layer for layer, value in zip(record.layers, record.metrics["grad_l2"]) if value == 0.0]
        keys = missing + zero
        holds = np.ones(len(keys), dtype=bool)
        # layers that have a gradient again reset their streak
        for layer in list(self.streaks.table):
            if layer not in keys:
                self.streaks.table.pop(layer)
        streaks = self.streaks.advance(keys, holds, record.step)
        due = [
            (layer, since)
            for layer, (count, since) in zip(keys, streaks)
            if count >= config.no_gradient_patience and not step.is_reported(self.kind, layer, "warning")
        ]
        # a parallel output branch whose own output gets no gradient (a detection scale with no targets in the
        # batches so far) is a note: the loss simply has nothing for that output
        silent = set(keys)
        outputs = [(layer, since) for layer, since in due if _output_silent(step, layer, silent)]
        cut = [(layer, since) for layer, since in due if (layer, since) not in outputs]
        found = []
        if cut:
            found.append(self._finding(step, cut, "warning"))
        outputs = [(layer, since) for layer, since in outputs if not step.is_reported(self.kind, layer, "note")]
        if outputs:
            found.append(self._finding(step, outputs, "note"))
        return found

    def _finding(self, step: StepContext, due: list[tuple[str, int]], severity: str) -> Finding:
        config, record = self.config, step.record
        never: list[str] = []
        cut: list[str] = []
        zeros: list[str] = []
        for layer, _ in due:
            if layer in record.missing:
                ran = step.modules_run
                (never if ran is not None and not _ran(layer, ran) else cut).append(layer)
            else:
                zeros.append(layer)
        layers = [layer for layer, _ in due]
        since = min(s for _, s in due)
        evidence: dict[str, Any] = {
            "never_called": never,
            "cut_off": cut,
            "zero": zeros,
            "parameters": {layer: record.missing.get(layer, []) for layer in layers[: config.max_layers_in_evidence]},
            "patience": config.no_gradient_patience,
            "world_size": step.world_size,
            "output_branch": severity == "note",
        }
        parts = []
        if never:
            parts.append(f"{len(never)} never ran in forward")
        if cut:
            parts.append(f"{len(cut)} ran but got no gradient (.grad is None)")
        if zeros:
            parts.append(f"{len(zeros)} got an exactly zero gradient")
        where = "is trainable and in the optimizer but has" if severity == "warning" else "is in an output branch that"
        message = (
            f"no gradient: {layers[0]} {where} received no gradient for {config.no_gradient_patience} logged "
            f"steps since step {since}; {len(layers)} layer(s): " + ", ".join(parts)
        )
        return step.finding(self.kind, layers[0], since, message, evidence, layers, severity=severity)


def _output_silent(step: StepContext, layer: str, silent: set[str]) -> bool:
    """Whether ``layer`` is in a parallel output branch whose last layer gets no gradient either."""
    branch = step.profile.output_branch_of(layer)
    return branch is not None and branch[-1] in silent


def _ran(layer: str, modules_run: set[str]) -> bool:
    """Whether the layer's module, or a module inside it (grouped layers), ran in forward."""
    prefix = layer + "."
    return layer in modules_run or any(name.startswith(prefix) for name in modules_run)
