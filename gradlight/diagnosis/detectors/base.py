"""The interface every detector implements, and what it is given at each logged step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gradlight.activations import ActivationStats
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.loss_curve import LossReading
from gradlight.diagnosis.finding import Finding
from gradlight.diagnosis.profile import ModelProfile, ResidualGain
from gradlight.diagnosis.rules import RuleContext, explain
from gradlight.diagnosis.windows import Streaks
from gradlight.signal import SignalStats
from gradlight.tracker import StepRecord

__all__ = ["Detector", "ForwardSeen", "GainScale", "Reference", "RunState", "StepContext"]


@dataclass(frozen=True)
class ForwardSeen:
    """Which parameter-owning modules one step's forward pass ran, among those that were watched.

    Attributes:
        ran: Names of the watched modules that ran.
        watched: Names of the modules that were watched; ``None``: every parameter-owning module.
    """

    ran: frozenset[str]
    watched: frozenset[str] | None = None

    def ran_layer(self, layer: str) -> bool | None:
        """Whether the layer's module (or a module inside it) ran; ``None`` when it was not watched."""
        prefix = layer + "."
        if self.watched is not None and not any(m == layer or m.startswith(prefix) for m in self.watched):
            return None
        return layer in self.ran or any(name.startswith(prefix) for name in self.ran)


@dataclass
class Reference:
    """The gradient a layer is compared to: the geometric mean of the last matrix layers' ``grad_l2``."""

    value: float
    layers: list[str]


@dataclass
class GainScale:
    """The residual gain(s) a layer's gradient carries by design (see :meth:`StepContext.gain_scale`)."""

    gain: ResidualGain  # the first on the layer's path (its own branch's)
    rms: float  # that gain's current rms
    factor: float  # the product of the largest current rms of every stage on the path


@dataclass
class RunState:
    """Facts about the run that one detector establishes and others read (kept in the engine's state)."""

    exploded: bool = False  # an exploding gradient was reported, or a growth is being confirmed
    peak_learning_rate: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Plain values."""
        return {"exploded": self.exploded, "peak_learning_rate": self.peak_learning_rate}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.exploded = bool(state.get("exploded", False))
        self.peak_learning_rate = float(state.get("peak_learning_rate", 0.0))


@dataclass
class StepContext:
    """Everything a detector may read about one logged step.

    Attributes:
        record: The step's gradient statistics.
        activations: The step's activation statistics, if taps are on.
        loss: The step's training loss, if known.
        loss_scaled: Whether a dynamic loss scaler (fp16 AMP) handles overflow.
        config: The thresholds.
        profile: The model profile.
        reference: The reference gradient (see :class:`Reference`).
        run: Run-wide facts shared between detectors.
        gradient_clip_val: The clip value when clipping is on.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        modules_run: Names of the parameter-owning modules seen running in forward (discovery), if known.
        world_size: Number of processes.
        is_reported: ``(kind, layer, severity) -> bool``: whether that finding was already reported.
        signal: The step's backward-signal statistics, if the taps are on (:mod:`gradlight.signal`).
        nonfinite_modules: Modules whose forward outputs held NaN/Inf on the step, first returned first, when
            the forward-origin taps ran (:class:`~gradlight.activations.ForwardOriginTaps`); else ``None``.
        forward: Which modules this step's forward pass ran, where they were watched (:class:`ForwardSeen`).
        grads_carried: Whether the gradient stepped with still held the optimizer's previous gradient (no
            ``zero_grad`` between the steps), ``None`` when unknown.
        loss_reading: The stream's loss curve read at this step, after the engine added the step's loss to it
            (:class:`~gradlight.diagnosis.detectors.loss_curve.LossReading`: one curve per optimizer stream, read
            once per logged step for every loss detector); ``None`` when the loss was not added (``loss_window``
            is ``None``, the loss is unknown or not finite) or no detector reads it.
        adaptive: The layers the optimizer steps per element, normalised by their gradient's own scale (Adam
            and its family), each with its decoupled weight decay per step (:mod:`gradlight.adaptive`);
            ``None`` when unknown.
    """

    record: StepRecord
    activations: ActivationStats | None
    loss: float | None
    loss_scaled: bool
    config: DiagnosisConfig
    profile: ModelProfile
    reference: Reference
    run: RunState
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    modules_run: set[str] | None = None
    world_size: int = 1
    is_reported: Callable[[str, str, str], bool] = field(default=lambda kind, layer, severity: False)
    signal: SignalStats | None = None
    nonfinite_modules: list[str] | None = None
    forward: ForwardSeen | None = None
    grads_carried: bool | None = None
    loss_reading: LossReading | None = None
    adaptive: Mapping[str, float] | None = None
    _gain_rms: dict[str, float] = field(default_factory=dict, repr=False)
    _grad_by_layer: dict[str, float] | None = field(default=None, repr=False)
    _update_reference: float | None = field(default=None, repr=False)

    def signal_path(self, first: str, last: str, below: float = -0.5) -> dict[str, Any] | None:
        """Where the backward signal is lost (or amplified) between ``first`` and ``last``, if it was tapped.

        Returns:
            ``None`` without signal taps or when the layers are not tapped blocks; else the decades the signal
            changes by from ``last``'s output back to ``first``'s input (``path_decades``), and the blocks
            between them whose gain is below ``below`` (``attenuating``: block -> gain, strongest first) or
            above ``-below`` decades (``amplifying``), each described by what the profile knows is inside it.
        """
        signal = self.signal
        if signal is None or first not in signal.blocks or last not in signal.blocks:
            return None
        i, j = sorted((signal.blocks.index(first), signal.blocks.index(last)))
        first, last = signal.blocks[i], signal.blocks[j]
        inside = set(signal.blocks[i : j + 1])
        gains = {b: g for b, g in zip(signal.blocks, signal.gain_decades.tolist()) if b in inside and math.isfinite(g)}
        attenuating = dict(sorted(((b, g) for b, g in gains.items() if g < below), key=lambda item: item[1]))
        amplifying = dict(sorted(((b, g) for b, g in gains.items() if g > -below), key=lambda item: -item[1]))
        decades = signal.path_decades(first, last)
        if not math.isfinite(decades):  # no input signal at the first block (the model's input): output to output
            out = signal.metrics["signal_l2"]
            with np.errstate(divide="ignore", invalid="ignore"):
                decades = float(np.log10(out[i]) - np.log10(out[j]))
        return {
            "first": first,
            "last": last,
            "path_decades": decades,
            "attenuating": attenuating,
            "amplifying": amplifying,
            "contents": {b: self.profile.describe_block(b) for b in [*attenuating, *amplifying][:3]},
        }

    def output_starved(self, layer: str, threshold: float) -> bool:
        """Whether ``layer`` sits in a parallel output branch whose last layer gets < ``threshold`` x the reference.

        Such a branch receives almost no gradient at its own output (a detection scale without targets in the
        batch): its small gradients say nothing about the gradient's flow through depth.
        """
        branch = self.profile.output_branch_of(layer)
        if not branch or not math.isfinite(self.reference.value) or self.reference.value <= 0:
            return False
        last = self._grad_l2_by_layer().get(branch[-1])
        return last is not None and last < threshold * self.reference.value

    def reference_update_ratio(self) -> float:
        """The geometric mean ``update_ratio`` of the reference layers this step, built once (0 when not recorded)."""
        if self._update_reference is None:
            update = self.record.metrics.get("update_ratio")
            where = {layer: i for i, layer in enumerate(self.record.layers)}
            values = (
                []
                if update is None
                else [float(update[where[layer]]) for layer in self.reference.layers if layer in where]
            )
            values = [value for value in values if math.isfinite(value) and value > 0.0]
            self._update_reference = math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0
        return self._update_reference

    def _grad_l2_by_layer(self) -> dict[str, float]:
        """``layer -> grad_l2`` of this step, built once."""
        if self._grad_by_layer is None:
            self._grad_by_layer = dict(zip(self.record.layers, self.record.metrics["grad_l2"].tolist()))
        return self._grad_by_layer

    def gain_scale(self, layer: str) -> GainScale | None:
        """The near-zero residual gain(s) ``layer``'s gradient carries by design, if any.

        Returns:
            The gain of the first stage on the layer's path (its own branch's, or the largest of the first
            stage for a layer upstream) and the product of every stage's largest current rms
            (:meth:`ModelProfile.gain_path`). Each gain is read from the model once per logged step, and only
            when asked for.
        """
        path = [stage for stage in self.profile.gain_path(layer) if stage]
        if not path:
            return None
        largest = [max(stage, key=self._rms) for stage in path]
        return GainScale(largest[0], self._rms(largest[0]), math.prod(self._rms(gain) for gain in largest))

    def _rms(self, gain: ResidualGain) -> float:
        rms = self._gain_rms.get(gain.parameter)
        if rms is None:
            rms = self._gain_rms[gain.parameter] = gain.current_rms()
        return rms

    @property
    def gradients_finite(self) -> bool:
        """Whether no gradient element of the step is NaN/Inf."""
        counts = self.record.metrics.get("grad_nonfinite")
        return counts is None or not bool(np.any(counts > 0))

    def finding(
        self,
        kind: str,
        layer: str,
        since: int,
        message: str,
        evidence: dict[str, Any],
        layers: list[str],
        severity: str = "warning",
    ) -> Finding:
        """A finding for this step, its cause and remedy taken from the rule table."""
        context = RuleContext(kind, self.profile, {**evidence, "layer": layer}, self.config)
        cause, remedy, ids = explain(context)
        evidence = {**evidence, "rules": ids}
        return Finding(kind, layer, since, self.record.step, message, cause, remedy, evidence, layers, severity)


class Detector:
    """One finding kind: its condition, its running state, and its part of the diagnosis' state.

    Subclasses set :attr:`kind` and implement :meth:`check`; state beyond :attr:`streaks` is saved by
    overriding :meth:`state_dict` / :meth:`load_state_dict` (call the base methods).

    Attributes:
        kind: The finding kind it reports.
        needs_finite_gradients: Skipped on steps whose gradients hold NaN/Inf (the non-finite detector
            speaks for those steps).
        needs_activations: Run only on steps with activation statistics.
        needs_loss_reading: Judges the loss curve: the engine keeps the curve only when a detector needs it, and
            runs this one only on steps with a :attr:`StepContext.loss_reading`.
    """

    kind: ClassVar[str] = ""
    needs_finite_gradients: ClassVar[bool] = True
    needs_activations: ClassVar[bool] = False
    needs_loss_reading: ClassVar[bool] = False

    def __init__(self, config: DiagnosisConfig) -> None:
        self.config = config
        self.streaks = Streaks()

    def check(self, step: StepContext) -> list[Finding]:
        """The findings of this kind at ``step`` (the engine drops already reported ones)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The detector's running state."""
        return {"streaks": self.streaks.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.streaks.load_state_dict(state.get("streaks", {}))


def finite_positive(values: np.ndarray) -> np.ndarray:
    """The finite, positive entries of ``values``."""
    return values[np.isfinite(values) & (values > 0)]


def decades_below(ratio: float) -> float:
    """``-log10(ratio)``; infinite for a ratio of 0."""
    return -math.log10(ratio) if ratio > 0 else float("inf")
