"""``vanishing``: a layer's gradient stays orders of magnitude below the reference, or the early layers lose it.

Two conditions, one kind:

* **level**: a layer's ``grad_l2`` stays below ``vanishing_ratio`` of the reference (the last matrix layers in
  forward order) for ``vanishing_patience`` logged steps;
* **trend**: the early-to-late ratio falls by ``trend_decades`` within ``trend_window`` logged steps *and ends
  that far below balanced* (a ratio that falls from too large to balanced is a recovery, not a loss). Both
  ends are levels, the median of the window's first and last thirds: a single batch's ratio swings by
  decades late in a converged run, and one spike followed by one dip is not a trend. The window is short (a
  few logged steps), so a slow decline is also measured from the *start of the run*: the level of the first
  logged steps (counted from balanced when it starts above, as a fall to balanced is no loss) against the
  latest level. Without it a vanishing that develops over a hundred steps (a BatchNorm-free YOLO: the first
  block's gradient falls from 0.3 of the head's at step 0 to 6e-5 of it, under a decade per window) is never
  seen by the window, however far it falls. When step 0 was logged, its ratio is a third anchor: measured
  before any update, it is the design's own balance, independent of the learning rate, while a warm-up can
  collapse the ratio within the first update (the same YOLO under Ultralytics' bias warm-up: 0.1 at step 0,
  3e-5 at step 2), inside the first third. Every fall must also exceed ``trend_significance`` standard errors
  of the two levels, from the ratio's step-to-step noise in the window: with one sample per step the ratio
  swings by decades, and medians of three such steps can differ by two without any trend.

A small gradient that the model's design explains is a ``note``, not a warning:

* a layer inside a residual branch scaled by a near-zero learnable gain (LayerScale, a zero-initialised last
  BatchNorm, ReZero) carries the gain as a factor: while the gains on its path are below ``gain_threshold`` a
  small gradient is expected (a note); once they have grown, its ratio is divided by them and judged. It is a
  warning when the gain does not grow for ``gain_patience`` logged steps, or when the branch is still below
  the threshold after dividing by grown gains;
* the query/key projections of attention blocks (second-order gradients while attention is near uniform);
* a layer that an adaptive optimizer (Adam and its family, :mod:`gradlight.adaptive`) still moves, in a model
  with normalisation layers: its update ratio, less decoupled weight decay, is not below ``vanishing_ratio``
  of the reference layers'. A normaliser's backward divides by its input's scale and removes the component
  along its output, so behind it a raw gradient shrinks as the run solves the task (a wav2vec2 classifier's
  encoder: 3 decades below its head while its loss fell to 0.13 and its weights kept moving at a fifth of
  the head's rate); an adaptive optimizer divides that scale out, so the update, not the gradient, says
  whether the layer is starved. It is judged only where a recorder knows the optimizer and the update
  ratio is recorded; without normalisation the small gradient stays the evidence whatever the optimizer (a
  12-layer sigmoid MLP under Adam: its first layer still moves at 0.4 of the head's rate, but its gradient,
  6 decades below, is what each of its steps does to the loss).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradlight.activations import SATURATING_KINDS, ActivationStats
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext, decades_below
from gradlight.diagnosis.finding import Finding, fmt, short_list

__all__ = ["VanishingDetector"]


class VanishingDetector(Detector):
    """See the module docstring."""

    kind = "vanishing"

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.trend: deque[tuple[int, float]] = deque(maxlen=config.trend_window)
        # (first step, last step, log10 level) of the run's first logged steps: the anchor of a slow decline,
        # and the first logged (step, log10 ratio): at step 0, initialisation
        self.start: tuple[int, int, float] | None = None
        self.initial: tuple[int, float] | None = None

    def check(self, step: StepContext) -> list[Finding]:
        """Level findings (warning and notes), then the trend."""
        return self._level(step) + self._trend(step)

    # ------------------------------------------------------------------------------------------ level
    def _level(self, step: StepContext) -> list[Finding]:
        config, record, profile = self.config, step.record, step.profile
        reference = step.reference
        grad = record.metrics["grad_l2"]
        if not math.isfinite(reference.value) or len(record.layers) - len(reference.layers) < 1:
            return []
        ratios = grad / reference.value
        per_element = _per_element_ratios(grad, record.layers, reference, profile.layer_sizes)
        # exactly zero is no gradient at all this step (a branch without targets, an unused path), not a
        # gradient that decayed on its way from the loss: that is `no_gradient`'s business, unless it ends a
        # vanishing streak (`_fell_to_zero`)
        # below the threshold in L2 and per element: a small layer has a small L2 by its size (a squeeze-excite
        # projection against a wide head), a large one a small RMS; a gradient that vanished is small in both
        holds = (ratios > 0.0) & (ratios < config.vanishing_ratio) & (per_element < config.vanishing_ratio)
        holds |= self._fell_to_zero(step, ratios)
        excluded = set(reference.layers) | profile.tied_layers
        holds &= np.array([layer not in excluded for layer in record.layers], dtype=bool)
        for i in np.flatnonzero(holds).tolist():  # an output branch without loss signal at its output: not depth decay
            if step.output_starved(record.layers[i], config.vanishing_ratio):
                holds[i] = False
        streaks = self.streaks.advance(record.layers, holds, record.step)
        sustained = [i for i, (count, _) in enumerate(streaks) if count >= config.vanishing_patience]
        if not sustained:
            return []
        real: list[int] = []
        gated: list[tuple[int, dict[str, Any]]] = []
        attention: list[int] = []
        adaptive: list[tuple[int, dict[str, Any]]] = []
        for i in sustained:
            layer = record.layers[i]
            scaled = step.gain_scale(layer)
            if scaled is not None:
                gain, rms = scaled.gain, scaled.rms
                compensated = float(ratios[i]) / max(scaled.factor, 1e-30)
                stuck = streaks[i][0] >= config.gain_patience and rms <= 2.0 * gain.initial_rms + 1e-12
                # while the gains are still near zero their compounded effect on the path (the readout through
                # other gated blocks, the averaging of a near-uniform attention) is not measured: expected; once
                # they have grown, the gradient is judged against them
                if scaled.factor < config.gain_threshold or compensated >= config.vanishing_ratio or stuck:
                    explained = "stuck_gain" if stuck else "residual_gain"
                    gated.append((i, {"gain": gain.parameter, "gain_rms": rms, "explained_by": explained,
                                      "gain_initial_rms": gain.initial_rms, "compensated_ratio": compensated,
                                      "streak": streaks[i][0], "upstream": layer not in gain.gated,
                                      "gain_factor": scaled.factor}))  # fmt: skip
                    continue
            elif layer in profile.attention_logit_layers:
                attention.append(i)
                continue
            moving = _still_moves(step, i, config.vanishing_ratio)
            if moving is not None:
                adaptive.append((i, moving))
                continue
            real.append(i)
        found: list[Finding] = []
        if real:
            found.append(self._warning(step, real, ratios, per_element))
        not_growing = [(i, extra) for i, extra in gated if extra["explained_by"] == "stuck_gain"]
        expected = [(i, extra) for i, extra in gated if extra["explained_by"] == "residual_gain"]
        if not_growing:
            found.append(self._explained(step, not_growing, ratios, "warning"))
        if expected:
            found.append(self._explained(step, expected, ratios, "note"))
        if attention:
            extra = {"explained_by": "attention_logits"}
            found.append(self._explained(step, [(i, extra) for i in attention], ratios, "note"))
        if adaptive:
            found.append(self._explained(step, adaptive, ratios, "note"))
        return found

    def _fell_to_zero(self, step: StepContext, ratios: np.ndarray) -> np.ndarray:
        """Layers whose gradient vanished the rest of the way: exactly 0 while their vanishing streak runs.

        Exactly zero is no gradient at all, but on a layer that ran this step's forward and was already below
        the threshold at the previous logged step it is the end of the same decline (the signal underflowed or
        the units above it died), not a branch without targets: the streak goes on.
        """
        forward = step.forward
        return np.array(
            [
                ratio == 0.0
                and self.streaks.since(layer) is not None
                and (forward is None or forward.ran_layer(layer) is not False)
                for layer, ratio in zip(step.record.layers, ratios.tolist())
            ],
            dtype=bool,
        )

    def _warning(self, step: StepContext, sustained: list[int], ratios: np.ndarray, per_element: np.ndarray) -> Finding:
        config, record, reference = self.config, step.record, step.reference
        first = sustained[0]
        layer = record.layers[first]
        ratio = float(ratios[first])
        decades = decades_below(ratio)
        since = self.streaks.since(layer)
        onset = record.layers[sustained[-1]]
        limit = config.max_layers_in_evidence
        evidence: dict[str, Any] = {
            "ratio": ratio,
            "decades": decades if math.isfinite(decades) else None,  # None: the gradient fell to exactly 0
            "grad_l2": float(record.metrics["grad_l2"][first]),
            "reference": reference.value,
            "reference_layers": reference.layers,
            "threshold": config.vanishing_ratio,
            "patience": config.vanishing_patience,
            "onset_layer": onset,
            "num_layers": len(sustained),
            "ratios": {record.layers[i]: float(ratios[i]) for i in sustained[:limit]},
            "per_element_ratio": float(per_element[first]),
            "early_late_ratio": float(record.global_metrics.get("early_late_ratio", np.nan)),
        }
        detail = ""
        if step.activations is not None:
            detail = _saturation_detail(step.activations, layer, int(record.depths[first]), evidence)
        detail += signal_detail(step, layer, reference.layers[-1] if reference.layers else layer, evidence, "loses")
        references = ", ".join(reference.layers)
        gets = f"gets {fmt(ratio)} of the reference gradient ({references}), {decades:.1f} decades below"
        if not math.isfinite(decades):
            gets = (
                f"gets no gradient at all now (exactly 0), after logged steps below {fmt(config.vanishing_ratio)} of "
                f"the reference gradient ({references})"
            )
        message = (
            f"vanishing gradient: layer {layer} {gets}, sustained since step {since}; "
            f"{len(sustained)} layer(s) below {fmt(config.vanishing_ratio)} from {layer} to {onset}{detail}"
        )
        layers = [record.layers[i] for i in sustained]
        return step.finding(self.kind, layer, since if since is not None else record.step, message, evidence, layers)

    def _explained(
        self, step: StepContext, items: list[tuple[int, dict[str, Any]]], ratios: np.ndarray, severity: str
    ) -> Finding:
        """One finding for layers whose small gradient the design explains (or a gain that does not grow)."""
        record, config = step.record, self.config
        first, extra = items[0]
        layer = record.layers[first]
        since = self.streaks.since(layer)
        ratio = float(ratios[first])
        evidence: dict[str, Any] = {
            **extra,
            "ratio": ratio,
            "decades": decades_below(ratio),
            "reference": step.reference.value,
            "reference_layers": step.reference.layers,
            "threshold": config.vanishing_ratio,
            "num_layers": len(items),
            "ratios": {record.layers[i]: float(ratios[i]) for i, _ in items[: config.max_layers_in_evidence]},
        }
        what = {
            "residual_gain": (
                "it runs before residual blocks whose branches are scaled by near-zero gains and may reach the "
                f"loss only through them (largest gain: {extra.get('gain')}"
                if extra.get("upstream")
                else f"its residual branch is scaled by the near-zero gain {extra.get('gain')}"
            )
            + f" (rms {fmt(float(extra.get('gain_rms', 0.0)))}); divided by the gain(s) on its path "
            f"({fmt(float(extra.get('gain_factor', 0.0)))}) it is "
            f"{fmt(float(extra.get('compensated_ratio', 0.0)))} of the reference: expected at initialisation",
            "stuck_gain": f"the residual gain {extra.get('gain')} scaling its branch is still "
            f"{fmt(float(extra.get('gain_rms', 0.0)))} (initially {fmt(float(extra.get('gain_initial_rms', 0.0)))}) "
            f"after {extra.get('streak')} logged steps",
            "attention_logits": "it is an attention query/key projection (second-order gradient while the "
            "attention is near uniform): expected early in training",
            "adaptive_update": "yet it still moves: its optimizer scales each element's step by that element's "
            f"own gradient scale, and its update ratio is {fmt(float(extra.get('update_ratio', 0.0)))}, "
            f"{fmt(float(extra.get('update_fraction', 0.0)))} of the reference layers' "
            f"({fmt(float(extra.get('reference_update_ratio', 0.0)))}); behind normalisation layers "
            f"({short_list(step.profile.normalization)}) a raw gradient shrinks as their inputs grow and as the "
            "representation aligns with what the head wants (solved, not starved)",
        }[str(extra["explained_by"])]
        title = "small gradient by design" if severity == "note" else "vanishing gradient"
        if extra["explained_by"] == "adaptive_update":
            title = "small gradient, still learning"
        message = (
            f"{title}: layer {layer} gets "
            f"{fmt(ratio)} of the reference gradient, {decades_below(ratio):.1f} decades below, since step "
            f"{since}; {what}; {len(items)} layer(s) like it"
        )
        layers = [record.layers[i] for i, _ in items]
        when = since if since is not None else record.step
        return step.finding(self.kind, layer, when, message, evidence, layers, severity=severity)

    # ------------------------------------------------------------------------------------------ trend
    def _trend(self, step: StepContext) -> list[Finding]:
        record, config = step.record, self.config
        ratio = float(record.global_metrics.get("early_late_ratio", np.nan))
        if not (math.isfinite(ratio) and ratio > 0) or not record.layers:
            return []
        self.trend.append((record.step, math.log10(ratio)))
        if self.initial is None:
            self.initial = self.trend[-1]
        if len(self.trend) < config.trend_window:
            return []
        # Levels, not single steps: the median of the window's first and last thirds. One batch's ratio can
        # swing two decades in a converged run (a hard sample spikes the head's gradient; a sparse embedding
        # gets little), so two single points can "fall" 2 decades without any trend.
        span = max(1, len(self.trend) // 3)
        points = list(self.trend)
        if self.start is None:
            self.start = (points[0][0], points[span - 1][0], statistics.median(v for _, v in points[:span]))
        last = statistics.median(value for _, value in points[-span:])
        # falling *into* the starving range: a ratio that falls from 400 to 1 gets balanced, not vanishing
        if last > -config.trend_decades:
            return []
        noise = _step_noise([value for _, value in points])
        for before, count, since_start in self._anchors(points, span):
            # from the start, a ratio that started above balanced counts from balanced: falling to it is no loss
            drop = (min(before[2], 0.0) if since_start else before[2]) - last
            # and beyond the levels' own noise: with one sample per step the ratio swings by decades, and
            # medians of three such steps can differ by two without any trend
            error = math.hypot(_level_error(noise, count), _level_error(noise, span))
            if drop >= max(config.trend_decades, config.trend_significance * error):
                return [self._trend_finding(step, before, (points[-span][0], last), drop, since_start)]
        return []

    def _anchors(self, points: list[tuple[int, float]], span: int) -> list[tuple[tuple[int, int, float], int, bool]]:
        """The earlier levels a fall is measured from: ``((first step, last step, log10), steps, since_start)``.

        The window's first third; the run's first logged steps (a slow decline, under a decade per window);
        and step 0 alone when it was logged, the ratio at initialisation, before any update, so independent of
        the learning rate (a warm-up can collapse the ratio within the first update, inside the first third).
        """
        window = (points[0][0], points[span - 1][0], statistics.median(v for _, v in points[:span]))
        anchors = [(window, span, False)]
        if self.start is not None:
            anchors.append((self.start, span, True))
        if self.initial is not None and self.initial[0] == 0:
            anchors.append(((0, 0, self.initial[1]), 1, True))
        return anchors

    def _trend_finding(
        self,
        step: StepContext,
        before: tuple[int, int, float],
        after: tuple[int, float],
        drop: float,
        since_start: bool,
    ) -> Finding:
        """The trend's finding: the level ``before`` (first step, last step, log10) fell ``drop`` decades."""
        record = step.record
        ratio = float(record.global_metrics["early_late_ratio"])
        (first_step, before_end, first), (after_start, last) = before, after
        layer = record.layers[0]
        evidence = {
            "trend_decades": drop,
            "early_late_ratio": ratio,
            "early_late_ratio_before": 10.0**first,
            "early_late_ratio_after": 10.0**last,
            "window_steps": [first_step, record.step],
            "since_start": since_start,
            "ratio": ratio,
            "decades": -math.log10(ratio),
        }
        where = "since the start of the run" if since_start else f"between steps {first_step} and {record.step}"
        if before_end == first_step == 0:
            earlier = f"{fmt(10.0**first)} at step 0, before any update"
        else:
            earlier = f"median {fmt(10.0**first)} over steps {first_step}-{before_end}"
        moving = _still_moves(step, 0, self.config.vanishing_ratio)
        title = "vanishing gradient trend" if moving is None else "falling gradient trend, still learning"
        message = (
            f"{title}: the early-to-late gradient ratio fell {drop:.1f} decades {where} "
            f"({earlier}; median {fmt(10.0**last)} over steps {after_start}-{record.step}); the first layer "
            f"{layer} is losing its gradient"
        )
        if moving is None:
            return step.finding(self.kind, layer, first_step, message, evidence, [layer])
        evidence.update(moving)
        message += (
            f"; yet it still moves: its optimizer scales each element's step by that element's own gradient scale, "
            f"and its update ratio is {fmt(moving['update_ratio'])}, {fmt(moving['update_fraction'])} of the "
            f"reference layers' ({fmt(moving['reference_update_ratio'])}), behind normalisation layers "
            f"({short_list(step.profile.normalization)})"
        )
        return step.finding(self.kind, layer, first_step, message, evidence, [layer], severity="note")

    def state_dict(self) -> dict[str, Any]:
        """Streaks plus the trend window."""
        return {
            **super().state_dict(),
            "trend": list(self.trend),
            "trend_start": self.start,
            "trend_initial": self.initial,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.trend = deque(((int(s), float(v)) for s, v in state.get("trend", [])), self.config.trend_window)
        start = state.get("trend_start")
        self.start = (int(start[0]), int(start[1]), float(start[2])) if start is not None else None
        initial = state.get("trend_initial")  # states of older versions have none: no anchor at initialisation
        self.initial = (int(initial[0]), float(initial[1])) if initial is not None else None


def _still_moves(step: StepContext, index: int, threshold: float) -> dict[str, Any] | None:
    """Evidence that a layer with a small gradient still moves like the reference layers; ``None`` when not shown.

    Shown only where the raw gradient is no measure of learning: the layer is stepped per element by an
    adaptive optimizer (:mod:`gradlight.adaptive`, known only to a recorder), the model has normalisation
    layers (whose backward divides by their input's scale and removes the gradient's component along their
    output: a layer's gradient shrinks as the run solves the task), and its update ratio less the decoupled
    weight decay is not below ``threshold`` of the reference layers' (the same "orders of magnitude" as the
    gradient rule). Without a recorded update ratio nothing is shown, and the gradient is judged as before.
    """
    record, adaptive = step.record, step.adaptive
    layer = record.layers[index]
    update = record.metrics.get("update_ratio")
    if adaptive is None or layer not in adaptive or update is None or not step.profile.normalization:
        return None
    own = float(update[index]) - adaptive[layer]
    reference = step.reference_update_ratio()
    if not (math.isfinite(own) and reference > 0.0) or own < threshold * reference:
        return None
    return {
        "explained_by": "adaptive_update",
        "update_ratio": float(update[index]),
        "decay_rate": adaptive[layer],
        "reference_update_ratio": reference,
        "update_fraction": own / reference,
        "normalization": list(step.profile.normalization),
    }


def _step_noise(values: list[float]) -> float:
    """The step-to-step noise of a log10 series: von Neumann's mean square successive difference.

    ``sqrt(mean((v[i+1] - v[i]) ** 2) / 2)``: a slow trend barely moves it (it differences out), while the rare
    jumps of a heavy-tailed series count in full, as they should (one sample per step: most steps agree,
    some land decades lower).

    Example:
        >>> round(_step_noise([0.0, 1.0, 0.0, 1.0, 0.0]), 2)
        0.71
        >>> _step_noise([0.0, -0.5, -1.0, -1.5])  # a steady fall is not noise
        0.0
    """
    differences = [(b - a) - (values[-1] - values[0]) / (len(values) - 1) for a, b in itertools.pairwise(values)]
    return math.sqrt(sum(d * d for d in differences) / (2.0 * len(differences))) if differences else 0.0


def _level_error(noise: float, count: int) -> float:
    """The standard error of a level: one step's noise, or the median of ``count`` steps' (``1.2533 / sqrt(n)``)."""
    return noise if count <= 1 else 1.2533 * noise / math.sqrt(count)


def signal_detail(step: StepContext, first: str, last: str, evidence: dict[str, Any], verb: str) -> str:
    """Where the backward signal is lost (``verb="loses"``) or amplified (``"gains"``), for a finding's message.

    Adds ``signal_path`` to ``evidence``; the message's detail, or ``""`` without signal taps.
    """
    path = step.signal_path(first, last)
    if path is None:
        return ""
    evidence["signal_path"] = path
    blocks = path["attenuating"] if verb == "loses" else path["amplifying"]
    decades = float(path["path_decades"])
    text = f"; the backward signal {'loses' if decades < 0 else 'gains'} {abs(decades):.1f} decades between "
    text += f"{path['first']} and {path['last']}"
    if blocks:
        named = [
            f"{abs(gain):.1f} at {block}" + (f" ({path['contents'][block]})" if path["contents"].get(block) else "")
            for block, gain in list(blocks.items())[:3]
        ]
        text += ", " + "; ".join(named)
    return text


def _per_element_ratios(grad: np.ndarray, layers: list[str], reference: Any, sizes: dict[str, int]) -> np.ndarray:
    """Each layer's gradient RMS over the reference layers' (the L2 ratios where sizes are unknown)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = grad / reference.value
        if not sizes or not all(layer in sizes for layer in (*layers, *reference.layers)):
            return l2
        ref_size = float(np.exp(np.mean([np.log(sizes[layer]) for layer in reference.layers])))
        counts = np.array([sizes[layer] for layer in layers], dtype=np.float64)
        return l2 * np.sqrt(ref_size / counts)


def _saturation_detail(activations: ActivationStats, layer: str, depth: int, evidence: dict[str, Any]) -> str:
    """Saturating activations on the layer's gradient path, added to ``evidence``; the message's detail."""
    downstream = sorted(
        {kind for kind, d in zip(activations.kinds, activations.depths) if kind in SATURATING_KINDS and int(d) > depth}
    )
    evidence["saturating_downstream"] = downstream
    detail = ""
    feeding = [i for i in activations.feeding(layer) if activations.kinds[i] in SATURATING_KINDS]
    if feeding:
        site = feeding[0]
        saturation = float(activations.metrics["act_saturation"][site])
        evidence["feeding_site"] = activations.sites[site]
        evidence["feeding_saturation"] = saturation
        detail = (
            f"; {saturation:.0%} of the {activations.kinds[site]} outputs feeding it "
            f"({activations.sites[site]}) are saturated"
        )
    between = [
        i
        for i, (kind, d) in enumerate(zip(activations.kinds, activations.depths))
        if kind in SATURATING_KINDS and int(d) > depth
    ]
    values = activations.metrics["act_saturation"][between]
    if between and np.isfinite(values).any():
        worst = between[int(np.nanargmax(values))]
        evidence["downstream_saturation_mean"] = float(np.nanmean(values))
        evidence["downstream_saturation_max"] = float(activations.metrics["act_saturation"][worst])
        evidence["downstream_saturation_site"] = activations.sites[worst]
        detail += (
            f"; its gradient passes {len(between)} saturating activation site(s) "
            f"({', '.join(sorted({activations.kinds[i] for i in between}))}) on the way from the loss, "
            f"{float(np.nanmean(values)):.0%} saturated on average "
            f"(max {evidence['downstream_saturation_max']:.0%} at {activations.sites[worst]})"
        )
    return detail
