"""Finding kinds, and what the recorder does about a finding (``on_anomaly``)."""

from __future__ import annotations

from collections.abc import Mapping

from gradlight.diagnosis.detectors import DETECTORS

__all__ = ["ACTIONS", "KINDS", "resolve_actions"]

#: Finding kinds, one per detector.
KINDS: tuple[str, ...] = tuple(detector.kind for detector in DETECTORS)
#: What the recorder does about a warning finding (notes are only recorded).
ACTIONS = ("warn", "raise", "stop", "ignore")


def resolve_actions(on_anomaly: str | Mapping[str, str]) -> dict[str, str]:
    """Expand ``on_anomaly`` into one action per kind, validating it.

    Args:
        on_anomaly: One of :data:`ACTIONS` for every kind, or a mapping ``kind -> action`` with an optional
            ``"default"`` entry (``"warn"`` if missing).

    Raises:
        ValueError: On an unknown action or kind.

    Example:
        >>> resolve_actions({"non_finite": "raise", "default": "warn"})["non_finite"]
        'raise'
    """
    if isinstance(on_anomaly, str):
        if on_anomaly not in ACTIONS:
            raise ValueError(f"`on_anomaly` must be one of {ACTIONS} or a mapping, got {on_anomaly!r}.")
        return dict.fromkeys(KINDS, on_anomaly)
    if not isinstance(on_anomaly, Mapping):
        raise ValueError(f"`on_anomaly` must be one of {ACTIONS} or a mapping kind -> action, got {on_anomaly!r}.")
    for key, value in on_anomaly.items():
        if key not in (*KINDS, "default"):
            raise ValueError(f"`on_anomaly` key {key!r} is not a finding kind; valid keys: {(*KINDS, 'default')}.")
        if value not in ACTIONS:
            raise ValueError(f"`on_anomaly[{key!r}]` must be one of {ACTIONS}, got {value!r}.")
    default = on_anomaly.get("default", "warn")
    return {kind: on_anomaly.get(kind, default) for kind in KINDS}
