"""What the diagnosis reports: a :class:`Finding` (defined in :mod:`gradlight.records`), the error raised for one."""

from __future__ import annotations

import math
from collections.abc import Iterable

from gradlight.records import Finding  # its home is the leaf module; imported here by the detectors

__all__ = ["GradientAnomalyError", "fmt", "short_list"]


class GradientAnomalyError(RuntimeError):
    """Raised by the recorder (under any front end) for warning findings whose action is ``"raise"`` (never for notes).

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


def fmt(value: float) -> str:
    """A number as the messages print it (``1.2e-05``; ``nan``/``inf`` as is)."""
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def short_list(names: Iterable[str], limit: int = 3) -> str:
    """Names as the messages list them: the first ``limit``, then how many more.

    Example:
        >>> short_list(["LayerNorm", "BatchNorm2d"]), short_list("abcde")
        ('LayerNorm, BatchNorm2d', 'a, b, c (+2 more)')
    """
    items = list(names)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
