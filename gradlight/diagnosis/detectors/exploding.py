"""``exploding``: gradient norms that blow up, pass an absolute threshold, or sit far above the clip value.

* **growth**: the global or a layer's ``grad_l2`` reaches ``exploding_factor`` times its median over the
  previous ``exploding_window`` logged steps, once the window holds ``exploding_min_history`` steps, and stays
  that high for ``exploding_confirm_steps`` more logged steps (against the baseline from before it rose). A
  blow-up rises and stays up; a large-loss batch late in a converged run, or an ordinary spike, comes down at
  the next step. A layer counts only if its norm is at least ``exploding_min_share`` of the largest layer's (a
  tiny gradient recovering from ~0 grows by large factors without blowing up), and a layer whose gradient was
  far below the reference gradient and has only caught up with it (at most its size now) is recovering from a
  vanishing start, not blowing up. A layer's rise must also reach ``exploding_new_high`` times the largest value
  in its window: a layer whose per-batch gradient is heavy-tailed (saturated sigmoids: near zero on most
  batches, large on a few) has been as large before, and a growth over its median says nothing new.
* **one-step blow-up**: a step moves a layer by at least ``exploding_jump_ratio`` of its weights' norm, and at
  the next logged step the global gradient has collapsed (below ``exploding_collapse`` of what it was): the
  step threw the network into a region where its units are dead or saturated (unnormalised 0-255 inputs, a
  constant or huge initialisation). A zero-initialised head or a LayerScale gain also moves by its own size
  early on, but its gradient does not collapse after it. The same step followed by a global gradient
  ``exploding_factor`` times larger *and* a loss ``runaway_loss_growth`` times higher is a blow-up in one step
  too, before the growth rule has the ``exploding_min_history`` steps it needs (measured on TheDeepChecker's
  0-255-pixel program: gradient 1e4 -> 1e10, loss 596 -> 6e11 after the first SGD step); a head recovering from
  zero grows its body's gradient by orders of magnitude too, but its loss falls.
* **absolute**: ``exploding_norm`` (global) or ``exploding_layer_norm`` (any layer), both off by default.
* **updates**: the median layer's ``update_ratio`` is at least ``exploding_update_ratio`` for
  ``exploding_update_patience`` logged steps and the loss has not fallen since those large steps began (the
  median loss over them is not below the loss before them), in two layers at least: a learning rate far too
  large redraws the weights of a deep net every step, and the changes compound through its depth, before the
  gradient norm itself blows up. One trainable layer (a fresh linear head over a frozen backbone, measured at
  20-40% per step with its loss rising for ten steps before it converges) is a convex fit that overshoots
  and comes back: not reported.
* **runaway**: a slow divergence, each step too small for the growth rule: over ``runaway_window`` logged
  steps the global ``grad_l2`` rose on ``runaway_rising`` of them and by ``runaway_growth`` in all, while the
  loss rose ``runaway_loss_growth`` times. Where the front end saw that the gradient an optimizer steps with
  still holds its previous step's gradient (no ``optimizer.zero_grad()`` between steps: the gradients
  accumulate, keep their direction and grow), a rise on ``runaway_carried_steps`` logged steps in a row is
  enough, and the cause says so.
* **clipping**: with clipping on, a pre-clip value ``clip_factor`` times the clip value for ``clip_patience``
  logged steps is a ``note`` (clipping acts on every step, as a learning-rate cut); with growth it is part of
  the warning (clipping hides the blow-up).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.detectors.vanishing import signal_detail
from gradlight.diagnosis.finding import Finding, fmt
from gradlight.diagnosis.windows import LayerWindows
from gradlight.records import GLOBAL_LAYER

__all__ = ["ExplodingDetector"]


@dataclass
class _Growth:
    """One step's gradient norms against the window (measured before the step joins it)."""

    norm: float  # global gradient L2
    growth: float  # norm / baseline (1.0 without enough history)
    baseline: float  # median of the previous window's positive global norms
    window_min: float
    previous: int  # logged steps in that window
    layers: dict[str, float]  # layer -> its L2 over the median of its previous window (enough history only)
    baselines: dict[str, float]  # layer -> that median
    current: dict[str, float]  # layer -> its L2 at this step
    maxima: dict[str, float] | None = None  # layer -> the largest L2 in its previous window (enough history only)

    def ranked(self) -> list[tuple[str, float]]:
        """Layers by growth, largest first."""
        return sorted(self.layers.items(), key=lambda item: -item[1])


@dataclass
class _Rise:
    """A growth seen but not yet confirmed: when it started and the baselines from before it."""

    step: int
    baseline: float
    layer_baselines: dict[str, float]
    confirmations: int = 0


class ExplodingDetector(Detector):
    """See the module docstring."""

    kind = "exploding"

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.global_norms: deque[tuple[int, float]] = deque(maxlen=config.exploding_window)
        self.layer_norms = LayerWindows(config.exploding_window)
        self.rise: _Rise | None = None
        self.large_update_losses: list[float] = []  # losses of the current run of large-update steps
        self.loss_before_large_updates: float | None = None  # the loss of the step before that run
        self.last_loss: float | None = None
        self.updates_reported_since: int | None = None  # first step of the large-update run last reported
        self.trajectory: deque[tuple[int, float, float]] = deque(maxlen=config.runaway_window)  # step, norm, loss
        self.initial_losses: list[float] = []  # the first logged finite losses: where training started
        # step, layer, its update ratio, the global norm, the loss (before that step's update; NaN: unknown)
        self.jump: tuple[int, str, float, float, float] | None = None

    def check(self, step: StepContext) -> list[Finding]:
        """Growth (confirmed), absolute thresholds, clipping note."""
        config, record = self.config, step.record
        growth = self._measure(step)
        finite = [value for value in growth.current.values() if math.isfinite(value)]
        floor = config.exploding_min_share * max(finite, default=0.0)
        growing = self._confirmed_growth(record.step, growth, floor, step)
        limit = config.exploding_layer_norm
        over = {name: value for name, value in growth.current.items() if limit is not None and value > limit}
        over_norm = config.exploding_norm is not None and growth.norm > config.exploding_norm
        clip_ratio = _clip_ratio(step)
        clip_count = 0
        if clip_ratio is not None:
            clip_count, _ = self.streaks.one("clip", clip_ratio >= config.clip_factor, record.step)
        clipped = clip_count >= config.clip_patience
        grew = growing is not None
        oversized = self._oversized_updates(step)
        if oversized is not None and not (grew or over or over_norm):
            step.run.exploded = True
            return [oversized]
        blowup = self._one_step_blowup(step, growth.norm)
        if blowup is not None and not (grew or over or over_norm):
            step.run.exploded = True
            return [blowup]
        runaway = self._runaway(step, growth.norm)
        if runaway is not None and not (grew or over or over_norm):
            step.run.exploded = True
            return [runaway]
        if not (grew or over or over_norm or clipped):
            return []
        if not (grew or over or over_norm):  # clipping alone: a note
            since = self.streaks.since("clip")
            return [self._clipping_note(step, growth, clip_ratio, since if since is not None else record.step)]
        step.run.exploded = True
        layers_grown = growing[1] if growing is not None else {}
        relevant = [name for name, _ in growth.ranked() if growth.current[name] >= floor]
        layer = GLOBAL_LAYER
        if layers_grown:
            layer = max(layers_grown, key=lambda name: layers_grown[name])
        elif over:
            layer = max(over, key=lambda name: over[name])  # the largest layer above the absolute threshold
        elif relevant:
            layer = relevant[0]  # the layer that grew most among those that matter
        elif finite:
            layer = max(growth.current, key=lambda name: growth.current[name])  # no per-layer history yet
        since = growing[0] if growing is not None else record.step
        evidence, message = self._evidence(step, growth, layer, over, over_norm, clip_ratio)
        if record.layers:
            message += signal_detail(step, record.layers[0], record.layers[-1], evidence, "gains")
        layers = list(dict.fromkeys([layer, *layers_grown, *over]))
        return [step.finding(self.kind, layer, since, message, evidence, layers)]

    # ------------------------------------------------------------------------------------------ growth
    def _measure(self, step: StepContext) -> _Growth:
        """The global and per-layer norms over their window medians; then add this step to the windows."""
        record, config = step.record, self.config
        norm = float(record.global_metrics.get("global_grad_l2", np.nan))
        history = [value for _, value in self.global_norms if value > 0]
        enough = len(history) >= min(config.exploding_min_history, config.exploding_window)
        baseline = statistics.median(history) if history else float("nan")  # small lists: no numpy overhead
        if math.isfinite(norm):
            self.global_norms.append((record.step, norm))
        values = np.asarray(record.metrics["grad_l2"], dtype=np.float64)
        current = dict(zip(record.layers, values.tolist()))
        columns = self.layer_norms.columns_of(record.layers)
        medians = self.layer_norms.positive_medians(columns)
        held = np.minimum(self.layer_norms.count[columns], config.exploding_window)
        with np.errstate(divide="ignore", invalid="ignore"):
            factors = values / medians
        compared = ~np.isnan(factors) & (held >= min(config.exploding_min_history, config.exploding_window))
        names = [name for name, kept in zip(record.layers, compared) if kept]
        layers = dict(zip(names, factors[compared].tolist()))
        baselines = dict(zip(names, medians[compared].tolist()))
        window = self.layer_norms.values[:, columns][:, compared]
        maxima = dict(zip(names, np.where(np.isfinite(window), window, 0.0).max(axis=0, initial=0.0).tolist()))
        self.layer_norms.push(columns, values)
        growth = norm / baseline if enough and not math.isnan(norm) else 1.0
        window_min = min(history) if history else float("nan")
        return _Growth(norm, growth, baseline, window_min, len(history), layers, baselines, current, maxima)

    def _confirmed_growth(
        self, step: int, growth: _Growth, floor: float, context: StepContext
    ) -> tuple[int, dict[str, float]] | None:
        """``(first step, layer -> growth)`` of a growth that rose and stayed up, else ``None``.

        A rise is remembered with the baselines from before it; each following logged step either confirms it
        (the global norm or a risen layer still ``exploding_factor`` above those baselines) or drops it. The loss of
        one batch says nothing here: a mislabelled or outlier batch late in a converged run can have a loss far
        above the run's first one, and its gradient comes back down at the next batch. Layers of
        the head's parallel output branches are compared only through the global norm: their own norms jump
        by orders of magnitude whenever a batch has targets for their output (a detection scale).
        """
        factor = self.config.exploding_factor
        recovering = self._recovering(growth, context)
        layers = {
            n: f
            for n, f in growth.layers.items()
            if f >= factor
            and growth.current[n] >= floor
            and context.profile.output_branch_of(n) is None
            and n not in recovering
            and growth.current[n] >= self.config.exploding_new_high * (growth.maxima or {}).get(n, 0.0)
        }
        rising = growth.growth >= factor or bool(layers)
        rise = self.rise
        if rise is not None and step != rise.step:
            still_global = math.isfinite(growth.norm) and growth.norm >= factor * rise.baseline
            still_layers = {
                n: growth.current[n] / base
                for n, base in rise.layer_baselines.items()
                if n in growth.current and base > 0 and growth.current[n] >= factor * base and n not in recovering
            }
            if still_global or still_layers:
                rise.confirmations += 1
            else:
                self.rise = rise = None
        if rise is None and rising:
            # A global rise carried by layers that are no new high for their window (a steady x3 per step) still
            # names them, against their baseline from before the rise.
            carriers = layers or {n for n, f in growth.layers.items() if f >= factor and n not in recovering}
            baselines = {n: growth.baselines[n] for n in carriers}
            baseline = growth.baseline if growth.growth >= factor else float("inf")
            self.rise = rise = _Rise(step, baseline, baselines)
        if rise is None or rise.confirmations < self.config.exploding_confirm_steps:
            return None
        grown = {n: growth.current[n] / base for n, base in rise.layer_baselines.items() if n in growth.current}
        return rise.step, grown

    def _recovering(self, growth: _Growth, context: StepContext) -> set[str]:
        """Layers that grew but only up to the reference gradient: they started far below it and caught up.

        A layer that grows ``exploding_factor`` times and ends at most at the reference started at least that
        far below it: a gradient recovering from a vanishing start (its loss starts to fall as it does). A
        blow-up takes a layer above the rest of the network, or the whole network with it (the global norm).
        """
        reference = context.reference.value
        if not (math.isfinite(reference) and reference > 0):
            return set()
        return {name for name in growth.baselines if growth.current.get(name, math.inf) <= reference}

    # ------------------------------------------------------------------------------------ one-step blow-up
    def _one_step_blowup(self, step: StepContext, norm: float) -> Finding | None:
        """The ``one-step blow-up`` condition (module docstring)."""
        config, record, jump = self.config, step.record, self.jump
        update = record.metrics.get("update_ratio")
        values = np.asarray(update if update is not None else [], dtype=np.float64)
        finite = np.where(np.isfinite(values), values, -np.inf)
        top = int(np.argmax(finite)) if finite.size else -1
        self.jump = None
        loss = step.loss if step.loss is not None else math.nan
        if top >= 0 and finite[top] >= config.exploding_jump_ratio and math.isfinite(norm) and norm > 0:
            self.jump = (record.step, record.layers[top], float(finite[top]), norm, loss)
        if jump is None or step.run.exploded or not math.isfinite(norm):
            return None
        since, layer, ratio, before, loss_before = jump
        grew = norm >= config.exploding_factor * before and loss >= config.runaway_loss_growth * loss_before > 0
        if norm > config.exploding_collapse * before and not grew:
            return None
        median = float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")
        evidence: dict[str, Any] = {
            "one_step_blowup": True,
            "one_step_growth": grew,
            "jump_step": since,
            "jump_update_ratio": ratio,
            "global_grad_l2_before": before,
            "global_grad_l2": norm,
            "median_update_ratio": median,
            "loss_before": loss_before,
            "loss": loss,
        }
        moved = (
            f"exploding in one step: the optimizer step at step {since} moved {layer} by {ratio:.0%} of its "
            f"weights' norm (healthy steps move ~0.1%), and by step {record.step} the global gradient L2 "
        )
        if grew:
            message = moved + (
                f"grew from {fmt(before)} to {fmt(norm)} and the loss from {fmt(loss_before)} to {fmt(loss)}"
            )
        else:
            message = moved + (
                f"collapsed from {fmt(before)} to {fmt(norm)}: the network was thrown where its units are dead or "
                "saturated"
            )
        return step.finding(self.kind, layer, since, message, evidence, [layer])

    # ----------------------------------------------------------------------------------------- runaway
    def _runaway(self, step: StepContext, norm: float) -> Finding | None:
        """The ``runaway`` condition (module docstring), from the trajectory of the norm and the loss."""
        config, loss = self.config, step.loss
        self.trajectory.append((step.record.step, norm, loss if loss is not None else float("nan")))
        if loss is not None and math.isfinite(loss) and len(self.initial_losses) < 3:
            self.initial_losses.append(loss)
        points = list(self.trajectory)
        carried = step.grads_carried is True
        recent = points[-(config.runaway_carried_steps + 1) :]
        if carried and len(recent) > config.runaway_carried_steps and _rises(recent) == 1.0:
            return self._runaway_finding(step, recent, carried=True)
        if len(points) < config.runaway_window or _rises(points) < config.runaway_rising:
            return None
        norms, losses = [p[1] for p in points], [p[2] for p in points]
        if not (norms[0] > 0 and norms[-1] >= config.runaway_growth * norms[0]):
            return None
        if _one_jump(norms):  # an outlier batch that set a converged run back: not a sustained rise
            return None
        before, after = statistics.median(losses[:3]), statistics.median(losses[-3:])
        if not (math.isfinite(before) and math.isfinite(after) and before > 0):
            return None
        if after < config.runaway_loss_growth * before:
            return None
        # A divergence climbs above where training started; a converged run set back by a hard batch (its loss
        # from ~0 to well below the untrained loss, its gradients with it) recovers and is not one.
        if self.initial_losses and after <= statistics.median(self.initial_losses):
            return None
        return self._runaway_finding(step, points, carried=False)

    def _runaway_finding(self, step: StepContext, points: list[tuple[int, float, float]], carried: bool) -> Finding:
        first, last = points[0], points[-1]
        rises = _rises(points)
        evidence: dict[str, Any] = {
            "runaway": True,
            "grads_carried": carried,
            "global_grad_l2": last[1],
            "grad_l2_start": first[1],
            "growth": last[1] / first[1] if first[1] > 0 else float("inf"),
            "rising_fraction": rises,
            "steps": len(points),
            "loss_start": first[2],
            "loss_end": last[2],
        }
        loss = ""
        if math.isfinite(first[2]) and math.isfinite(last[2]):
            loss = f", the loss {fmt(first[2])} -> {fmt(last[2])}"
        if carried:
            message = (
                f"exploding gradient (accumulating): the gradient the optimizer stepped with at step "
                f"{step.record.step} still held its previous step's gradient, and the global gradient L2 rose on "
                f"each of the last {len(points) - 1} logged steps ({fmt(first[1])} -> {fmt(last[1])}{loss})"
            )
        else:
            message = (
                f"exploding gradient (slow divergence): over the last {len(points)} logged steps the global "
                f"gradient L2 rose on {rises:.0%} of them, {fmt(first[1])} -> {fmt(last[1])} "
                f"({evidence['growth']:.0f}x){loss}"
            )
        return step.finding(self.kind, GLOBAL_LAYER, first[0], message, evidence, [GLOBAL_LAYER])

    # ----------------------------------------------------------------------------------------- updates
    def _oversized_updates(self, step: StepContext) -> Finding | None:
        """The ``updates`` condition (module docstring): a finding once it has held for its patience."""
        config, record = self.config, step.record
        limit, loss = config.exploding_update_ratio, step.loss
        update = record.metrics.get("update_ratio")
        values = np.asarray(update if update is not None else [], dtype=np.float64)
        finite = values[np.isfinite(values)]
        known_loss = loss is not None and math.isfinite(loss)
        median = float(np.median(finite)) if finite.size else 0.0
        # Two layers at least: a deep net's output changes by the product of its layers' relative changes; a
        # single trainable layer (a linear head over a frozen backbone) is a convex fit that overshoots and
        # comes back, however large its steps.
        large = limit is not None and known_loss and int((finite >= limit).sum()) >= 2 and median >= limit
        if not large:
            self.large_update_losses = []
            self.last_loss = loss if known_loss else None
            self.streaks.one("updates", False, record.step)
            return None
        assert loss is not None  # known_loss
        if not self.large_update_losses:
            self.loss_before_large_updates = self.last_loss if self.last_loss is not None else loss
        self.large_update_losses.append(loss)
        self.last_loss = loss
        before = self.loss_before_large_updates
        loss_median = statistics.median(self.large_update_losses)
        not_falling = before is not None and loss_median >= before
        count, since = self.streaks.one("updates", not_falling, record.step)
        if count < config.exploding_update_patience or since == self.updates_reported_since:
            return None  # not yet, or this run of large updates was reported already
        self.updates_reported_since = since
        ranked = sorted(
            ((name, float(v)) for name, v in zip(record.layers, values.tolist()) if math.isfinite(v)),
            key=lambda item: -item[1],
        )
        layer = ranked[0][0]
        evidence: dict[str, Any] = {
            "median_update_ratio": median,
            "update_ratio_threshold": limit,
            "patience": config.exploding_update_patience,
            "loss_before": before,
            "loss_median": loss_median,
            "layer_update_ratio": dict(ranked[: config.max_layers_in_evidence]),
            "global_grad_l2": float(record.global_metrics.get("global_grad_l2", np.nan)),
        }
        message = (
            f"exploding updates since step {since}: each optimizer step changes the median layer's weights by "
            f"{median:.0%} of their norm (threshold {limit:.0%}; healthy steps move ~0.1%), {layer} by "
            f"{ranked[0][1]:.0%}, and the loss has not fallen (median {fmt(loss_median)} against "
            f"{fmt(float(before or 0.0))} before): the learning rate is far too large for this model"
        )
        return step.finding(self.kind, layer, since, message, evidence, [name for name, _ in ranked[:3]])

    # ---------------------------------------------------------------------------------------- messages
    def _clipping_note(self, step: StepContext, growth: _Growth, clip_ratio: float | None, since: int) -> Finding:
        ratio = float(clip_ratio or 0.0)
        what = "largest gradient element" if step.gradient_clip_algorithm == "value" else "global norm"
        evidence = {
            "clip_ratio": ratio,
            "clip_value": step.gradient_clip_val,
            "clip_algorithm": step.gradient_clip_algorithm,
            "clip_factor": self.config.clip_factor,
            "global_grad_l2": growth.norm,
            "clipping_only": True,
        }
        message = (
            f"gradient clipping is active on every logged step since step {since}: the pre-clip {what} is "
            f"{ratio:.1f}x the clip value {step.gradient_clip_val} and not growing"
        )
        return step.finding(self.kind, GLOBAL_LAYER, since, message, evidence, [GLOBAL_LAYER], severity="note")

    def _evidence(
        self,
        step: StepContext,
        growth: _Growth,
        layer: str,
        over: dict[str, float],
        over_norm: bool,
        clip_ratio: float | None,
    ) -> tuple[dict[str, Any], str]:
        """The evidence and message of an exploding warning."""
        config = self.config
        evidence: dict[str, Any] = {
            "global_grad_l2": growth.norm,
            "growth": growth.growth,
            "window": config.exploding_window,
            "factor": config.exploding_factor,
            "window_median": growth.baseline,
            "window_min": growth.window_min,
            "layer_growth": dict(growth.ranked()[: config.max_layers_in_evidence]),
        }
        rise = self.rise
        if rise is not None and rise.confirmations >= config.exploding_confirm_steps:
            # growth against the baselines from before the rise (the window has taken the rise in since)
            evidence["rise_step"] = rise.step
            evidence["confirmed_steps"] = rise.confirmations
            if math.isfinite(rise.baseline):
                evidence["window_median"] = rise.baseline
                evidence["growth"] = growth.norm / rise.baseline
            risen = {n: growth.current[n] / b for n, b in rise.layer_baselines.items() if n in growth.current}
            evidence["layer_growth"] = {**evidence["layer_growth"], **risen}
            growth.layers.update(risen)
        parts = [f"global gradient L2 {fmt(growth.norm)}"]
        if growth.previous:
            parts.append(f"{growth.growth:.0f}x its median over the previous {growth.previous} logged steps")
        if config.exploding_norm is not None:
            evidence["exploding_norm"] = config.exploding_norm
            if over_norm:
                parts.append(f"above exploding_norm {fmt(config.exploding_norm)}")
        if layer in growth.layers:
            parts.append(f"{layer} grew {growth.layers[layer]:.0f}x")
        if config.exploding_layer_norm is not None:
            largest = sorted(over.items(), key=lambda item: -item[1])
            evidence["exploding_layer_norm"] = config.exploding_layer_norm
            evidence["layers_over_norm"] = dict(largest[: config.max_layers_in_evidence])
            if largest:
                parts.append(
                    f"{len(largest)} layer(s) above exploding_layer_norm {fmt(config.exploding_layer_norm)} "
                    f"(largest: {largest[0][0]} at {fmt(largest[0][1])})"
                )
        if clip_ratio is not None:
            evidence["clip_ratio"] = clip_ratio
            evidence["clip_value"] = step.gradient_clip_val
            evidence["clip_algorithm"] = step.gradient_clip_algorithm
            what = "largest gradient element" if step.gradient_clip_algorithm == "value" else "global norm"
            parts.append(f"pre-clip {what} {clip_ratio:.1f}x the clip value {step.gradient_clip_val}")
        return evidence, f"exploding gradient at step {step.record.step}: " + ", ".join(parts)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Streaks, windows and an unconfirmed rise."""
        rise = self.rise
        return {
            **super().state_dict(),
            "global_norms": list(self.global_norms),
            "layer_norms": self.layer_norms.to_lists(),
            "rise": None
            if rise is None
            else [rise.step, rise.baseline, dict(rise.layer_baselines), rise.confirmations],
            "large_update_losses": list(self.large_update_losses),
            "loss_before_large_updates": self.loss_before_large_updates,
            "last_loss": self.last_loss,
            "updates_reported_since": self.updates_reported_since,
            "trajectory": [list(point) for point in self.trajectory],
            "initial_losses": list(self.initial_losses),
            "jump": None if self.jump is None else [*self.jump[:4], _or_none(self.jump[4])],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        window = self.config.exploding_window
        self.global_norms = deque(((int(s), float(v)) for s, v in state.get("global_norms", [])), window)
        self.layer_norms = LayerWindows.from_lists(window, state.get("layer_norms", {}))
        rise = state.get("rise")
        self.rise = None if not rise else _Rise(int(rise[0]), float(rise[1]), dict(rise[2]), int(rise[3]))
        self.large_update_losses = [float(v) for v in state.get("large_update_losses", [])]
        before, last = state.get("loss_before_large_updates"), state.get("last_loss")
        self.loss_before_large_updates = None if before is None else float(before)
        self.last_loss = None if last is None else float(last)
        reported = state.get("updates_reported_since")
        self.updates_reported_since = None if reported is None else int(reported)
        self.initial_losses = [float(v) for v in state.get("initial_losses", [])]
        trajectory = ((int(p[0]), float(p[1]), float(p[2])) for p in state.get("trajectory", []))
        self.trajectory = deque(trajectory, maxlen=self.config.runaway_window)
        jump = state.get("jump")
        self.jump = None
        if jump:
            loss = float(jump[4]) if len(jump) > 4 and jump[4] is not None else math.nan
            self.jump = (int(jump[0]), str(jump[1]), float(jump[2]), float(jump[3]), loss)


def _or_none(value: float) -> float | None:
    """``value``, or ``None`` when it is NaN (a checkpoint holds no NaN)."""
    return None if math.isnan(value) else value


def _clip_ratio(step: StepContext) -> float | None:
    if not step.gradient_clip_val:
        return None
    key = "global_grad_max_abs" if step.gradient_clip_algorithm == "value" else "global_grad_l2"
    value = float(step.record.global_metrics.get(key, np.nan))
    return value / step.gradient_clip_val if math.isfinite(value) else None


def _rises(points: list[tuple[int, float, float]]) -> float:
    """Share of successive points whose norm is above the one before (0 with fewer than two)."""
    pairs = list(itertools.pairwise(points))
    return sum(1 for a, b in pairs if b[1] > a[1]) / len(pairs) if pairs else 0.0


def _one_jump(norms: list[float]) -> bool:
    """Whether one step between consecutive norms carries more than half of the window's whole rise (in log)."""
    logs = [math.log(v) for v in norms if v > 0 and math.isfinite(v)]
    if len(logs) < 2 or logs[-1] <= logs[0]:
        return False
    largest = max(b - a for a, b in itertools.pairwise(logs))
    return largest > 0.5 * (logs[-1] - logs[0])
