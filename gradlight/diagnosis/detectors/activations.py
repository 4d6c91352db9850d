"""``saturated`` and ``dead_units``: from the activation taps, sites stuck in a flat region or never active."""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import ClassVar

from gradlight.activations import DEAD_KINDS, SATURATING_KINDS, ActivationStats
from gradlight.diagnosis.detectors.base import Detector, StepContext
from gradlight.diagnosis.finding import Finding

__all__ = ["DeadUnitsDetector", "SaturatedDetector"]


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
            if count >= self.config.activation_patience and not step.is_reported(self.kind, site, "warning"):
                new.append((i, since))
        if not new:
            return []
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
        }
        message = (
            f"{self.title}: {fraction:.0%} of the {stats.kinds[worst]} {self.what} at {site} (feeding "
            f"{stats.feeds[worst]}), since step {since}; {len(new)} site(s) above {threshold:.0%}"
        )
        layers = [site] + [stats.sites[i] for i, _ in new if i != worst]
        return [step.finding(self.kind, site, since, message, evidence, layers)]


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


class DeadUnitsDetector(_ActivationDetector):
    """ReLU-family units that were never active on a whole batch."""

    kind = "dead_units"
    metric = "act_dead"
    site_kinds = DEAD_KINDS
    what = "units dead on the whole batch"
    title = "dead units"

    def threshold(self) -> float:
        """``dead_fraction``."""
        return self.config.dead_fraction
