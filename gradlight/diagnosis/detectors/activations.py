"""``saturated`` and ``dead_units``: from the activation taps, sites stuck in a flat region or never active."""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar

from gradlight.activations import DEAD_KINDS, SATURATING_KINDS, ActivationStats
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding

__all__ = ["DeadUnitsDetector", "SaturatedDetector"]

_SEVERITY = ("note", "warning")


class _ActivationDetector(Detector):
    """A site whose fraction (``metric``) stays at least ``threshold`` for ``activation_patience`` steps."""

    needs_activations = True
    needs_finite_gradients = False
    metric: ClassVar[str] = ""
    site_kinds: ClassVar[AbstractSet[str]] = frozenset()
    what: ClassVar[str] = ""
    title: ClassVar[str] = ""

    def threshold(self) -> float:
        """The fraction at which a site counts."""
        raise NotImplementedError

    def counts(self, stats: ActivationStats, site: int) -> bool:
        """Whether a site of this kind can be reported at all."""
        return stats.kinds[site] in self.site_kinds

    def check(self, step: StepContext) -> list[Finding]:
        """See the class docstring."""
        stats = step.activations
        if stats is None:
            return []
        threshold = self.threshold()
        values = stats.metrics[self.metric]
        new: list[tuple[int, int]] = []
        for i, site in enumerate(stats.sites):
            value = float(values[i])
            holds = self.counts(stats, i) and math.isfinite(value) and value >= threshold
            count, since = self.streaks.one(site, holds, stats.step)
            if count >= self.config.activation_patience:
                new.append((i, since))
        return self.report(step, stats, new)

    def report(self, step: StepContext, stats: ActivationStats, sites: list[tuple[int, int]]) -> list[Finding]:
        """The warning for the sites (index, since) whose condition held long enough, if not reported yet."""
        fresh = [(i, since) for i, since in sites if not step.is_reported(self.kind, stats.sites[i], "warning")]
        return [self._finding(step, stats, fresh, "warning", {})] if fresh else []

    def _finding(
        self,
        step: StepContext,
        stats: ActivationStats,
        new: list[tuple[int, int]],
        severity: str,
        extra: dict[str, Any],
        message: str | None = None,
    ) -> Finding:
        values = stats.metrics[self.metric]
        threshold = self.threshold()
        worst, since = max(new, key=lambda item: float(values[item[0]]))
        site = stats.sites[worst]
        fraction = float(values[worst])
        limit = self.config.max_layers_in_evidence
        evidence = {
            "fraction": fraction,
            "threshold": threshold,
            "activation": stats.kinds[worst],
            "feeds": stats.feeds[worst],
            "fractions": {stats.sites[i]: float(values[i]) for i, _ in new[:limit]},
            "act_mean": float(stats.metrics["act_mean"][worst]),
            "act_std": float(stats.metrics["act_std"][worst]),
            **extra,
        }
        message = message or (
            f"{self.title}: {fraction:.0%} of the {stats.kinds[worst]} {self.what} at {site} (feeding "
            f"{stats.feeds[worst]}), since step {since}; {len(new)} site(s) above {threshold:.0%}"
        )
        layers = [site] + [stats.sites[i] for i, _ in new if i != worst]
        return step.finding(self.kind, site, since, message, evidence, layers, severity)


class SaturatedDetector(_ActivationDetector):
    """Saturating activations (sigmoid, tanh, ...) with most outputs in their flat region.

    Sites that feed no layer (an output sigmoid) are not reported: confident predictions saturate them by
    design.
    """

    kind = "saturated"
    metric = "act_saturation"
    site_kinds = SATURATING_KINDS
    what = "outputs in the flat region"
    title = "saturated activations"

    def threshold(self) -> float:
        """``saturated_fraction``."""
        return self.config.saturated_fraction

    def counts(self, stats: ActivationStats, site: int) -> bool:
        """Saturating kinds that feed a layer."""
        return super().counts(stats, site) and stats.feeds[site] is not None

    def report(self, step: StepContext, stats: ActivationStats, sites: list[tuple[int, int]]) -> list[Finding]:
        """A warning for the sites behind other layers; a note for one right after the model's first layer.

        A site fed by the first layer in forward order (the one that reads the model's input) sits upstream of
        no other layer: its saturation starves only that layer, whose weight gradient is the input times the
        backpropagated signal, so large inputs (unnormalised features: the usual reason such a site saturates)
        scale it up as much as the flat region scales it down. Its units act as thresholds of the input and the
        network trains on (measured on AUTOTRAINER's Blob program, docs/diagnosis.md): a note. When that layer's
        gradient collapses after all (inputs so large that every unit is flat), ``vanishing`` warns about it.
        """
        first = [(i, since) for i, since in sites if _reads_input(stats, i)]
        found = super().report(step, stats, [item for item in sites if item not in first])
        first = [(i, s) for i, s in first if not any(step.is_reported(self.kind, stats.sites[i], v) for v in _SEVERITY)]
        if first:
            found.append(self._finding(step, stats, first, "note", _input_layer(step, stats, first)))
        return found


def _reads_input(stats: ActivationStats, site: int) -> bool:
    """Whether the site is fed by the first layer in forward order: the layer it feeds is the second one."""
    return stats.feeds[site] is not None and int(stats.depths[site]) == 1


def _input_layer(step: StepContext, stats: ActivationStats, sites: list[tuple[int, int]]) -> dict[str, Any]:
    """Evidence for a site after the first layer: that layer, and its gradient over the reference at this step."""
    first = next((layer for layer, depth in zip(step.record.layers, step.record.depths) if int(depth) == 0), None)
    reference = step.reference.value
    ratio = None
    if first is not None and math.isfinite(reference) and reference > 0:
        ratio = step.record.value("grad_l2", first) / reference
    return {"input_layer": first, "input_layer_ratio": ratio}


class DeadUnitsDetector(_ActivationDetector):
    """ReLU-family units that were never active on a whole batch.

    A hidden layer has units to spare, so it counts once ``dead_fraction`` of them are dead. The model's output
    activation (a site that feeds no layer) has none: each of its units is one output (a class's score, a target),
    and a unit that is never positive outputs 0 for every input and passes no gradient to anything before it.
    Such a site counts with a single unit dead when that unit has been dead since the first step the site was
    judged: no gradient ever reached it (a ReLU put on the logits). A unit that learned to stay at 0 got there by
    its gradient (its target is 0, e.g. the blank border pixels an autoencoder reconstructs) and is not reported.
    Only sites present on the first tapped step count as outputs: a site first seen later (a branch that did not
    run then) feeds no known layer because the taps did not see what runs after it, not because it is the output.
    """

    kind = "dead_units"
    metric = "act_dead"
    site_kinds = DEAD_KINDS
    what = "units dead on the whole batch"
    title = "dead units"

    def __init__(self, config: DiagnosisConfig) -> None:
        super().__init__(config)
        self.first_judged: dict[str, int] = {}  # output site -> the first step its act_dead was known
        self.first_sites: set[str] | None = None  # the sites of the first tapped step

    def threshold(self) -> float:
        """``dead_fraction``."""
        return self.config.dead_fraction

    def check(self, step: StepContext) -> list[Finding]:
        """Hidden and output sites at ``dead_fraction``; output sites with a unit dead since the start."""
        found = super().check(step)
        stats = step.activations
        if stats is None:
            return found
        if self.first_sites is None:
            self.first_sites = set(stats.sites)
        born_dead: list[tuple[int, int]] = []
        for i, site in enumerate(stats.sites):
            value = float(stats.metrics[self.metric][i])
            output = stats.feeds[i] is None and site in self.first_sites and stats.kinds[i] in self.site_kinds
            if not output or not math.isfinite(value):
                continue
            first = self.first_judged.setdefault(site, stats.step)
            count, since = self.streaks.one(f"{site}#output", value > 0.0, stats.step)
            if count >= self.config.activation_patience and since == first:
                born_dead.append((i, since))
        covered = {layer for finding in found for layer in finding.layers}
        fresh = [
            (i, since)
            for i, since in born_dead
            if stats.sites[i] not in covered and not step.is_reported(self.kind, stats.sites[i], "warning")
        ]
        if fresh:
            found.append(self._output_finding(step, stats, fresh))
        return found

    def _output_finding(self, step: StepContext, stats: ActivationStats, sites: list[tuple[int, int]]) -> Finding:
        i, since = sites[0]
        fraction = float(stats.metrics[self.metric][i])
        message = (
            f"dead output units: {fraction:.0%} of the units of the model's output activation "
            f"({stats.kinds[i]} at {stats.sites[i]}, feeding no layer) have never been positive since step {since}: "
            "those outputs are 0 for every input and get no gradient"
        )
        return self._finding(step, stats, sites, "warning", {"output_site": True}, message)

    def state_dict(self) -> dict[str, Any]:
        """Streaks and the first judged step of each output site."""
        first_sites = None if self.first_sites is None else sorted(self.first_sites)
        return {**super().state_dict(), "first_judged": dict(self.first_judged), "first_sites": first_sites}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.first_judged = {str(k): int(v) for k, v in state.get("first_judged", {}).items()}
        first_sites = state.get("first_sites")
        self.first_sites = None if first_sites is None else {str(site) for site in first_sites}
