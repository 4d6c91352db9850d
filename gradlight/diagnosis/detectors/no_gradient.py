"""``no_gradient``: trainable parameters handed to the optimizer that get no gradient at all.

Every layer is judged on the logged steps of the optimizer that owns it (the steps whose record lists it,
with or without a gradient), over a window of its last ``no_gradient_window`` such steps:

* A layer without a gradient (``.grad is None``, or exactly zero) on ``no_gradient_patience`` of its steps in a
  row is reported, as long as no layer of the model takes part on some steps only.
* Computation that skips layers by design (LayerDrop, whole-layer stochastic depth, early exit, experts
  routed on some steps) shows as layers that get a gradient on some steps and none on others. Once that is
  seen, a layer is reported only after a run of steps without a gradient that such skipping would produce
  with a chance below ``no_gradient_chance`` (the skip rate measured over the skipping layers' windows). A
  layer that takes part on some steps is healthy.
* The cause is what was seen over the steps without a gradient, not on the first one: whether the layer's
  module ran in forward on each of them (the front end watches it) -- never, or on some or all of them -- or
  whether its gradient was exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding

__all__ = ["NoGradientDetector"]

# Observation codes, one per layer and logged step of its optimizer (0: none yet).
_GRADIENT, _ZERO, _RAN, _NOT_RAN, _UNKNOWN = 1, 2, 3, 4, 5


class _Observations:
    """The last ``size`` observations of every layer (one ring per column), with its run without a gradient."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.columns: dict[str, int] = {}
        self.codes = np.zeros((size, 0), dtype=np.int8)
        self.count = np.zeros(0, dtype=np.int64)
        self.streak = np.zeros(0, dtype=np.int64)  # logged steps in a row without a gradient
        self.since = np.zeros(0, dtype=np.int64)  # first step of that run

    def columns_of(self, layers: list[str]) -> np.ndarray:
        new = [name for name in dict.fromkeys(layers) if name not in self.columns]
        if new:
            for name in new:
                self.columns[name] = len(self.columns)
            self.codes = np.hstack([self.codes, np.zeros((self.size, len(new)), dtype=np.int8)])
            grow = np.zeros(len(new), dtype=np.int64)
            self.count, self.streak, self.since = (
                np.concatenate([a, grow]) for a in (self.count, self.streak, self.since)
            )
        return np.fromiter((self.columns[name] for name in layers), dtype=np.int64, count=len(layers))

    def push(self, columns: np.ndarray, codes: np.ndarray, step: int) -> None:
        self.codes[self.count[columns] % self.size, columns] = codes
        self.count[columns] += 1
        got = codes == _GRADIENT
        started = ~got & (self.streak[columns] == 0)
        self.since[columns[started]] = step
        self.streak[columns] = np.where(got, 0, self.streak[columns] + 1)

    def recent(self, column: int, n: int) -> np.ndarray:
        """The column's last ``n`` codes (at most the window), oldest first."""
        total = int(self.count[column])
        held = min(n, total, self.size)
        return np.array([self.codes[(total - held + k) % self.size, column] for k in range(held)], dtype=np.int8)

    def skip_rate(self) -> float | None:
        """Share of steps without a gradient over the layers that have steps with and without one."""
        codes = self.codes
        got = (codes == _GRADIENT).any(axis=0)
        missed = (codes >= _ZERO).any(axis=0)
        mixed = got & missed
        if not mixed.any():
            return None
        window = codes[:, mixed]
        return float((window >= _ZERO).sum() / max(int((window > 0).sum()), 1))

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {
                "codes": self.recent(column, self.size).tolist(),
                "streak": int(self.streak[column]),
                "since": int(self.since[column]),
            }
            for name, column in self.columns.items()
        }

    @classmethod
    def from_state(cls, size: int, state: Mapping[str, Any]) -> _Observations:
        observations = cls(size)
        names = list(state)
        columns = observations.columns_of(names)
        for name, column in zip(names, columns.tolist()):
            codes = [int(c) for c in state[name].get("codes", [])][-size:]
            for k, code in enumerate(codes):
                observations.codes[k, column] = code
            observations.count[column] = len(codes)
            observations.streak[column] = int(state[name].get("streak", 0))
            observations.since[column] = int(state[name].get("since", 0))
        return observations


class NoGradientDetector(Detector):
    """Layers in the optimizer that receive no gradient (see the module docstring).

    Intentionally frozen parameters (``requires_grad=False``) are never monitored, so never reported.
    """

    kind = "no_gradient"
    needs_finite_gradients = False

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.observations = _Observations(max(config.no_gradient_window, config.no_gradient_patience))

    def check(self, step: StepContext) -> list[Finding]:
        """See the module docstring."""
        record = self.record_step(step)
        required = self.required_streak()
        obs = self.observations
        keys = list(record.layers) + list(record.missing)
        columns = obs.columns_of(keys)
        due = [
            (layer, int(obs.since[column]))
            for layer, column in zip(keys, columns.tolist())
            if obs.streak[column] >= required and not step.is_reported(self.kind, layer, "warning")
        ]
        if not due:
            return []
        # a parallel output branch whose own output gets no gradient (a detection scale with no targets in the
        # batches so far) is a note: the loss simply has nothing for that output
        silent = {layer for layer, column in zip(keys, columns.tolist()) if obs.streak[column] > 0}
        outputs = [(layer, since) for layer, since in due if _output_silent(step, layer, silent)]
        cut = [(layer, since) for layer, since in due if (layer, since) not in outputs]
        found = []
        if cut:
            found.append(self._finding(step, cut, "warning", required))
        outputs = [(layer, since) for layer, since in outputs if not step.is_reported(self.kind, layer, "note")]
        if outputs:
            found.append(self._finding(step, outputs, "note", required))
        return found

    def record_step(self, step: StepContext) -> Any:
        """Append this step's observation of every layer that takes part in it (present or missing)."""
        record = step.record
        grad = np.asarray(record.metrics["grad_l2"], dtype=np.float64)
        missing = list(record.missing)
        codes = [_ZERO if value == 0.0 else _GRADIENT for value in grad.tolist()]
        codes += [_forward_code(step, layer) for layer in missing]
        columns = self.observations.columns_of(list(record.layers) + missing)
        self.observations.push(columns, np.asarray(codes, dtype=np.int8), record.step)
        return record

    def required_streak(self) -> int:
        """Steps in a row without a gradient that make a finding (module docstring)."""
        config = self.config
        rate = self.observations.skip_rate()
        if rate is None:
            return config.no_gradient_patience
        if rate >= 1.0:
            return self.observations.size
        needed = math.ceil(math.log(config.no_gradient_chance) / math.log(max(rate, 1e-12)))
        return min(max(config.no_gradient_patience, needed), self.observations.size)

    def _finding(self, step: StepContext, due: list[tuple[str, int]], severity: str, required: int) -> Finding:
        config, record = self.config, step.record
        groups: dict[str, list[str]] = {"never": [], "cut": [], "zero": []}
        observed: dict[str, dict[str, int]] = {}
        for layer, _ in due:
            kind, counts = self._cause_of(step, layer)
            groups[kind].append(layer)
            observed[layer] = counts
        never, cut, zeros = groups["never"], groups["cut"], groups["zero"]
        layers = [layer for layer, _ in due]
        since = min(s for _, s in due)
        streak = int(self.observations.streak[self.observations.columns[layers[0]]])
        rate = self.observations.skip_rate()
        evidence: dict[str, Any] = {
            "never_called": never,
            "cut_off": cut,
            "zero": zeros,
            "parameters": {layer: record.missing.get(layer, []) for layer in layers[: config.max_layers_in_evidence]},
            "observed": {layer: observed[layer] for layer in layers[: config.max_layers_in_evidence]},
            "steps_without_gradient": streak,
            "required_steps": required,
            "skip_rate": rate,
            "patience": config.no_gradient_patience,
            "world_size": step.world_size,
            "output_branch": severity == "note",
        }
        parts = []
        if never:
            parts.append(f"{len(never)} did not run in forward on any of those steps")
        if cut:
            ran = observed[cut[0]]
            parts.append(
                f"{len(cut)} ran in forward but got no gradient (.grad is None; {cut[0]} ran on "
                f"{ran['ran']} of the {ran['ran'] + ran['not_ran']} steps watched)"
                if ran["ran"] + ran["not_ran"]
                else f"{len(cut)} ran in forward but got no gradient (.grad is None)"
            )
        if zeros:
            parts.append(f"{len(zeros)} got an exactly zero gradient")
        where = "is trainable and in the optimizer but has" if severity == "warning" else "is in an output branch that"
        skipping = (
            f" (other layers skip {rate:.0%} of their steps by design, so {required} steps in a row were needed)"
            if rate is not None
            else ""
        )
        message = (
            f"no gradient: {layers[0]} {where} received no gradient on its last {streak} logged steps since step "
            f"{since}{skipping}; {len(layers)} layer(s): " + ", ".join(parts)
        )
        return step.finding(self.kind, layers[0], since, message, evidence, layers, severity=severity)

    def _cause_of(self, step: StepContext, layer: str) -> tuple[str, dict[str, int]]:
        """``never`` / ``cut`` / ``zero`` from the observations of the layer's steps without a gradient."""
        obs = self.observations
        column = obs.columns[layer]
        codes = obs.recent(column, int(obs.streak[column]))
        counts = {
            "steps": int(codes.size),
            "ran": int((codes == _RAN).sum()),
            "not_ran": int((codes == _NOT_RAN).sum()),
            "unknown": int((codes == _UNKNOWN).sum()),
            "zero": int((codes == _ZERO).sum()),
        }
        if counts["zero"] == counts["steps"]:
            return "zero", counts
        if counts["ran"]:
            return "cut", counts
        if counts["not_ran"]:
            return "never", counts
        ran = step.modules_run  # nothing watched: what the forward-order discovery saw
        return ("never" if ran is not None and not _ran(layer, ran) else "cut"), counts

    def state_dict(self) -> dict[str, Any]:
        """Streaks and the per-layer observations."""
        return {**super().state_dict(), "observations": self.observations.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        size = max(self.config.no_gradient_window, self.config.no_gradient_patience)
        self.observations = _Observations.from_state(size, state.get("observations", {}))


def _forward_code(step: StepContext, layer: str) -> int:
    """Whether a layer without a gradient ran in this step's forward pass, where that was watched."""
    forward = step.forward
    ran = forward.ran_layer(layer) if forward is not None else None
    if ran is None:
        return _UNKNOWN
    return _RAN if ran else _NOT_RAN


def _output_silent(step: StepContext, layer: str, silent: set[str]) -> bool:
    """Whether ``layer`` is in a parallel output branch whose last layer gets no gradient either."""
    branch = step.profile.output_branch_of(layer)
    return branch is not None and branch[-1] in silent


def _ran(layer: str, modules_run: set[str]) -> bool:
    """Whether the layer's module, or a module inside it (grouped layers), ran in forward."""
    prefix = layer + "."
    return layer in modules_run or any(name.startswith(prefix) for name in modules_run)
