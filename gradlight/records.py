"""The records that storage and analysis share: a diagnosis :class:`Finding` and the global layer's name.

A leaf module (no torch, no other gradlight module): the run folder and the history (storage) read and write
these records, the diagnosis (analysis) produces them, and neither has to import the other for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["GLOBAL_LAYER", "SEVERITIES", "Finding", "jsonable"]

#: Layer name of run-wide values: the history's rows of global metrics and findings about the whole model.
GLOBAL_LAYER = "__global__"
#: ``warning``: something is wrong (``on_anomaly`` acts on it); ``note``: worth knowing, expected here.
SEVERITIES = ("warning", "note")


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
        severity: ``"warning"`` (the recorder's ``on_anomaly`` acts on it) or ``"note"`` (recorded, shown in
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


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers, recursively (for ``json.dumps``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
