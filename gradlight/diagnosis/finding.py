"""What the diagnosis reports: a :class:`Finding`, its severity, and the error raised for one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradlight.layers import GLOBAL_LAYER

__all__ = ["GLOBAL", "SEVERITIES", "Finding", "GradientAnomalyError"]

#: ``warning``: something is wrong (``on_anomaly`` acts on it); ``note``: worth knowing, expected here.
SEVERITIES = ("warning", "note")
#: ``layer`` of findings about the whole model: the history's global pseudo-layer.
GLOBAL = GLOBAL_LAYER


@dataclass
class Finding:
    """One diagnosed problem (``warning``) or observation (``note``).

    Attributes:
        kind: One of :data:`gradlight.diagnosis.KINDS`.
        layer: The layer (or activation site) it is about; ``"__global__"`` for the whole model.
        step: The first logged step at which the condition held.
        reported_step: The logged step at which it was reported (after the patience window).
        message: One human-readable sentence with the measured evidence.
        cause: The likely cause(s), from :data:`gradlight.diagnosis.RULES`.
        remedy: What usually fixes it.
        evidence: The measured values (ratios, decades, norms, fractions, steps, ``rules``).
        layers: Every layer/site affected (``layer`` is the first of them).
        severity: ``"warning"`` (the monitor's ``on_anomaly`` acts on it) or ``"note"`` (recorded, shown in
            reports, counted separately: expected in this situation, e.g. a branch behind a near-zero
            LayerScale at initialisation, or clipping that is active on every step).

    Example:
        >>> finding = Finding("dormant", "fc1", 5, 9, "fc1 does not move", "lr 0", "check param groups")
        >>> finding.to_dict()["layer"], finding.step, finding.severity
        ('fc1', 5, 'warning')
    """

    kind: str
    layer: str
    step: int
    reported_step: int
    message: str
    cause: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    severity: str = "warning"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding `severity` must be one of {SEVERITIES}, got {self.severity!r}.")

    @property
    def is_warning(self) -> bool:
        """Whether the finding says something is wrong (not a ``note``)."""
        return self.severity == "warning"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``findings.jsonl`` line)."""
        return jsonable(asdict(self))


class GradientAnomalyError(RuntimeError):
    """Raised by the monitor for warning findings whose action is ``"raise"`` (never for notes).

    Attributes:
        findings: The findings that triggered it.

    Example:
        >>> monitor = GradientFlowMonitor(on_anomaly={"non_finite": "raise"})  # doctest: +SKIP
        >>> try:  # doctest: +SKIP
        ...     trainer.fit(model)
        ... except GradientAnomalyError as error:
        ...     print(error.findings[0].layer, error.findings[0].step)
    """

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("\n".join(f.message for f in self.findings) or "gradient anomaly")


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers, recursively (for ``json.dumps``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def fmt(value: float) -> str:
    """A number as the messages print it (``1.2e-05``; ``nan``/``inf`` as is)."""
    return f"{value:.1e}" if math.isfinite(value) else str(value)
