"""The engine: runs every detector on each logged step, de-duplicates findings, and keeps the state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradlight.activations import ActivationStats
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors import DETECTORS, Detector, ForwardSeen, Reference, RunState, StepContext
from gradlight.diagnosis.detectors.loss_curve import LossCurve, LossReading
from gradlight.diagnosis.finding import Finding
from gradlight.diagnosis.profile import ModelProfile
from gradlight.records import GLOBAL_LAYER
from gradlight.signal import SignalStats
from gradlight.tracker import StepRecord

__all__ = ["GradientDiagnosis"]


class GradientDiagnosis:
    """Turns a stream of step records into findings. Trainer-free; deterministic given its inputs.

    Given identical inputs every rank reaches the same findings. Under DDP every rank holds the same records
    (gradients are all-reduced) and activation statistics are reduced across ranks; the loss is each rank's
    own, and only the findings that read it can differ between ranks: ``dormant`` (its loss-change gate) and
    the cause of a ``non_finite`` finding (``loss_finite``).

    Args:
        config: Thresholds; defaults to :class:`DiagnosisConfig()`.
        profile: The model profile (:meth:`ModelProfile.from_model`); an empty profile if ``None``.
        gradient_clip_val: The clip value when gradient clipping is on (``trainer.gradient_clip_val``).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        detectors: The detector classes to run (default :data:`~gradlight.diagnosis.detectors.DETECTORS`).

    Attributes:
        findings: Findings reported by this instance, oldest first (a resumed run starts empty).
        findings_count: Warning-level findings reported over the run (survives resume).
        notes_count: Note-level findings reported over the run (survives resume).
        modules_run: Names of the parameter-owning modules seen running in forward, when known (the recorder
            sets it from the tracker's discovery); lets ``no_gradient`` tell "never called" from "cut off".
        world_size: Number of processes (for the wording of causes).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gradlight.tracker import GradientFlowTracker
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(12):
        ...     layers += [nn.Linear(16, 16), nn.Sigmoid()]
        >>> net = nn.Sequential(*layers, nn.Linear(16, 1))
        >>> tracker = GradientFlowTracker(net)
        >>> diagnosis = GradientDiagnosis(profile=ModelProfile.from_model(net))
        >>> findings = []
        >>> for step in range(3):
        ...     net.zero_grad()
        ...     net(torch.randn(32, 16)).pow(2).mean().backward()
        ...     tracker.capture(step, net.parameters())
        ...     findings += diagnosis.update(tracker.finalize())
        >>> findings[0].kind, findings[0].layer, findings[0].step, findings[0].severity
        ('vanishing', '0', 0, 'warning')
    """

    def __init__(
        self,
        config: DiagnosisConfig | None = None,
        profile: ModelProfile | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = "norm",
        detectors: Sequence[type[Detector]] = DETECTORS,
    ) -> None:
        self.config = config if config is not None else DiagnosisConfig()
        self.profile = profile if profile is not None else ModelProfile()
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.gradient_clip_algorithm = gradient_clip_algorithm or "norm"
        self.detectors = [detector(self.config) for detector in detectors]
        #: (kind, layer, severity, scope) of every finding reported; ``scope`` is the stream of a whole-model
        #: (``__global__``) finding with several optimizers, ``""`` otherwise (a layer belongs to one optimizer).
        self.reported: set[tuple[str, str, str, str]] = set()
        self.findings_count = 0
        self.notes_count = 0
        self.findings: list[Finding] = []
        self.modules_run: set[str] | None = None
        self.world_size = 1
        self.run = RunState()
        #: The stream (optimizer) whose state :attr:`detectors` hold: the first one seen (see :meth:`update`).
        self.default_stream: str | None = None
        #: Detectors of every other stream, by stream key.
        self.streams: dict[str, list[Detector]] = {}
        #: The loss curve of the first stream seen, and of every other stream by stream key: each logged step's
        #: loss is added to its stream's curve once and the curve read once, for every loss detector.
        self.loss_curve = LossCurve(self.config)
        self.stream_loss_curves: dict[str, LossCurve] = {}
        self._reads_loss = any(detector.needs_loss_reading for detector in self.detectors)

    def update(
        self,
        record: StepRecord,
        activations: ActivationStats | None = None,
        loss: float | None = None,
        loss_scaled: bool = False,
        signal: SignalStats | None = None,
        nonfinite_modules: list[str] | None = None,
        stream: str | None = None,
        forward: ForwardSeen | None = None,
        grads_carried: bool | None = None,
        adaptive: Mapping[str, float] | None = None,
    ) -> list[Finding]:
        """Digest one logged step and return the findings reported at it (each kind, layer, severity once).

        Args:
            record: The step's gradient statistics.
            activations: The step's activation statistics, if taps are on.
            loss: The step's training loss, if known (used by the dormant rule and non-finite causes).
            loss_scaled: A dynamic loss scaler (fp16 AMP) handles overflow: it skips the step and lowers its
                scale, so non-finite gradients are reported only when they persist for
                ``scaled_non_finite_patience`` logged steps.
            signal: The step's backward-signal statistics, if the taps are on: ``vanishing`` and
                ``exploding`` findings then name the blocks where the signal is lost or amplified.
            nonfinite_modules: The modules whose forward outputs held NaN/Inf on the step, first returned first
                (:class:`~gradlight.activations.ForwardOriginTaps`), if they were tapped: a ``non_finite``
                finding then names where in forward the value was born.
            stream: Which optimizer stepped (any stable key, e.g. its first parameter's name); ``None`` for
                one optimizer. Every stream keeps its own running state (windows, streaks, baselines): with
                several optimizers a layer's rules count the steps of the optimizer that owns it, and one
                network's norms are never compared with another's.
            forward: Which modules were seen running in this step's forward pass, where they were watched
                (``no_gradient`` tells "never ran" from "ran but got no gradient" with it, step by step).
            grads_carried: Whether the gradient this optimizer stepped with still held its previous step's
                gradient (``optimizer.zero_grad()`` not called between them; :mod:`gradlight.carry_probe`),
                ``None`` when unknown.
            adaptive: The layers this optimizer steps per element, normalised by their gradient's own scale
                (Adam and its family, :func:`gradlight.adaptive.adaptive_decay`), each with its decoupled
                weight decay per step; ``None`` when unknown. ``vanishing`` then reads such a layer's update
                ratio before calling its small gradient starved.
        """
        detectors, curve = self._stream_of(stream)
        step = StepContext(
            record=record,
            activations=activations,
            loss=loss,
            loss_scaled=loss_scaled,
            config=self.config,
            profile=self.profile,
            reference=self.reference(record),
            run=self.run,
            gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            modules_run=self.modules_run,
            world_size=self.world_size,
            signal=signal,
            nonfinite_modules=nonfinite_modules,
            forward=forward,
            grads_carried=grads_carried,
            loss_reading=self._read_loss(curve, record.step, loss),
            adaptive=adaptive,
            is_reported=lambda kind, layer, severity: _key(kind, layer, severity, stream) in self.reported,
        )
        finite = step.gradients_finite
        found: list[Finding] = []
        for detector in detectors:
            if (
                (detector.needs_finite_gradients and not finite)
                or (detector.needs_activations and activations is None)
                or (detector.needs_loss_reading and step.loss_reading is None)
            ):
                continue
            found += detector.check(step)
        new = [
            self._name_stream(f, stream)
            for f in found
            if _key(f.kind, f.layer, f.severity, stream) not in self.reported
        ]
        for finding in new:
            for layer in (finding.layer, *finding.layers):
                self.reported.add(_key(finding.kind, layer, finding.severity, stream))
            if finding.is_warning:
                self.findings_count += 1
            else:
                self.notes_count += 1
        self.findings.extend(new)
        return new

    def _name_stream(self, finding: Finding, stream: str | None) -> Finding:
        """A whole-model finding with several optimizers says whose steps it is about (its message and evidence)."""
        if stream is None or finding.layer != GLOBAL_LAYER or not self.streams:
            return finding
        evidence = {**finding.evidence, "optimizer": stream}
        message = f"{finding.message} (on the steps of the optimizer of `{stream}`)"
        return dataclasses.replace(finding, evidence=evidence, message=message)

    def _stream_of(self, stream: str | None) -> tuple[list[Detector], LossCurve]:
        """The detectors and the loss curve that keep ``stream``'s state.

        The first stream seen uses :attr:`detectors` and :attr:`loss_curve`.
        """
        if stream is None:
            return self.detectors, self.loss_curve
        if self.default_stream is None:
            self.default_stream = stream
        if stream == self.default_stream:
            return self.detectors, self.loss_curve
        if stream not in self.streams:
            self.streams[stream] = [type(detector)(self.config) for detector in self.detectors]
            self.stream_loss_curves[stream] = LossCurve(self.config)
        return self.streams[stream], self.stream_loss_curves[stream]

    def _read_loss(self, curve: LossCurve, step: int, loss: float | None) -> LossReading | None:
        """The stream's loss curve read after adding the step's loss (:attr:`StepContext.loss_reading`).

        ``None`` when no detector reads it, ``loss_window`` is ``None``, or the loss is unknown or not finite
        (then nothing is added).
        """
        if not self._reads_loss or self.config.loss_window is None:
            return None
        return curve.update(step, loss)

    def reference(self, record: StepRecord) -> Reference:
        """The reference gradient: geometric mean of the last ``reference_layers`` matrix layers' ``grad_l2``.

        Matrix layers (Linear, Conv, Embedding weights) only, and no tied layer: a trailing scalar owned by
        the root module or a tied embedding says nothing about the gradient that reaches the output layers.
        Falls back to every layer when the profile knows none of the record's layers.
        """
        grad = record.metrics["grad_l2"]
        matrix = self.profile.matrix_layers
        tied = self.profile.tied_layers
        eligible = [i for i, layer in enumerate(record.layers) if (not matrix or layer in matrix) and layer not in tied]
        if not eligible:
            eligible = list(range(len(record.layers)))
        count = min(self.config.reference_layers, max(1, len(eligible) - 1))
        chosen = eligible[-count:]
        values = grad[chosen] if chosen else grad[:0]
        keep = np.isfinite(values) & (values > 0)
        if not keep.any():
            return Reference(float("nan"), [])
        return Reference(float(np.exp(np.log(values[keep]).mean())), [record.layers[i] for i in chosen])

    def state_dict(self) -> dict[str, Any]:
        """What was reported and every stream's state (detectors, loss curve), so a resumed run does not re-report."""
        return {
            "version": 3,
            "reported": sorted(list(key) for key in self.reported),
            "findings_count": self.findings_count,
            "notes_count": self.notes_count,
            "run": self.run.state_dict(),
            "detectors": {detector.kind: detector.state_dict() for detector in self.detectors},
            "loss_curve": self.loss_curve.state_dict(),
            "default_stream": self.default_stream,
            "streams": {
                key: {detector.kind: detector.state_dict() for detector in detectors}
                for key, detectors in self.streams.items()
            },
            "stream_loss_curves": {key: curve.state_dict() for key, curve in self.stream_loss_curves.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        A version-1 state restores what was reported and the count. A version-2 state kept the loss curve in each
        loss detector's state (``"curve"``, the same losses in each): the first one found is the stream's curve.
        """
        self.reported = {
            (
                str(entry[0]),
                str(entry[1]),
                str(entry[2]) if len(entry) > 2 else "warning",
                str(entry[3]) if len(entry) > 3 else "",
            )
            for entry in state.get("reported", [])
        }
        self.findings_count = int(state.get("findings_count", 0))
        self.notes_count = int(state.get("notes_count", 0))
        self.run.load_state_dict(state.get("run", {"exploded": state.get("exploded", False)}))
        _load_detectors(self.detectors, state.get("detectors", {}))
        self.loss_curve = self._loss_curve(state.get("loss_curve"), state.get("detectors", {}))
        default = state.get("default_stream")
        self.default_stream = None if default is None else str(default)
        self.streams, self.stream_loss_curves = {}, {}
        curves = state.get("stream_loss_curves", {})
        for key, states in state.get("streams", {}).items():
            self.streams[str(key)] = [type(detector)(self.config) for detector in self.detectors]
            _load_detectors(self.streams[str(key)], states)
            self.stream_loss_curves[str(key)] = self._loss_curve(curves.get(key), states)

    def _loss_curve(self, state: Mapping[str, Any] | None, detectors: Mapping[str, Any]) -> LossCurve:
        """A stream's loss curve from its ``state``; without one (a version-2 state), from its detectors' states."""
        if state is None:
            state = next((entry["curve"] for entry in detectors.values() if "curve" in entry), {})
        curve = LossCurve(self.config)
        curve.load_state_dict(state)
        return curve


def _key(kind: str, layer: str, severity: str, stream: str | None) -> tuple[str, str, str, str]:
    """What makes a finding reported once: a whole-model finding once per optimizer stream, a layer's once."""
    return kind, layer, severity, (stream or "") if layer == GLOBAL_LAYER else ""


def _load_detectors(detectors: list[Detector], states: Mapping[str, Any]) -> None:
    for detector in detectors:
        if detector.kind in states:
            detector.load_state_dict(states[detector.kind])
