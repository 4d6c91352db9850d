"""The verdict on one run: its findings (``gradlight.load_findings``) against what the run was built to show.

* A **healthy** run passes with zero warning-level findings; notes are allowed and listed.
* A **broken** run passes when a warning of its class (the expected kind, or a kind accepted as the same
  class, e.g. ``non_finite`` for a blow-up that reaches NaN/Inf) names the faulty layer (``layer`` or any of
  ``layers`` matches one of the expectation's fnmatch patterns, or is the first layer in forward order) and
  is reported within ``tolerance`` logged steps of the fault's onset (``onset <= reported_step <= onset +
  tolerance * log_every``).

With several optimizers (a GAN's generator and discriminator under manual optimization) every optimizer step
has its own step number, so a layer's logged steps are those of the optimizer that owns it (the generator's
0, 2, 4, ...): given :class:`Streams`, the window is ``tolerance`` logged steps *of that optimizer* after the
onset, counted from the steps it took.

A findings frame without a ``severity`` column (gradlight before severities) counts every finding as a
warning; so does a missing value in that column.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = [
    "ANY_LAYER",
    "FIRST_LAYER",
    "HEALTHY",
    "TOLERANCE",
    "Expectation",
    "Streams",
    "Verdict",
    "score",
    "with_severity",
]

#: Expectation kind of a run with nothing wrong.
HEALTHY = "healthy"
#: Layer pattern meaning "the first layer in forward order" (depth 0 of the run's history).
FIRST_LAYER = "<first layer>"
#: Layer pattern meaning "any layer, including ``__global__``" (a fault of the whole model).
ANY_LAYER = "*"
#: A broken run's finding must be reported within this many logged steps of the onset.
TOLERANCE = 5
_SEVERITIES = ("warning", "note")
_REQUIRED = ("kind", "layer", "step", "reported_step")


@dataclass(frozen=True)
class Expectation:
    """What a run should produce.

    Attributes:
        kind: ``"healthy"`` or the finding kind the fault must produce.
        layers: fnmatch patterns on layer names relative to the bare model (:data:`FIRST_LAYER`,
            :data:`ANY_LAYER` allowed); one must be named by the finding.
        onset: Optimizer step at which the fault starts (0: from initialisation).
        tolerance: Logged steps after the onset the finding may take, when not ``score``'s ``tolerance``: a
            model that skips layers by design needs more steps to tell a module that never runs from one it
            skips at random.
        also: Finding kinds accepted as the same class (``("non_finite",)`` where the gradients of a
            blow-up reach NaN/Inf).

    Example:
        >>> Expectation("vanishing", (FIRST_LAYER,)).describe()
        'vanishing @ <first layer> from step 0'
    """

    kind: str = HEALTHY
    layers: tuple[str, ...] = ()
    onset: int = 0
    also: tuple[str, ...] = ()
    tolerance: int | None = None

    def __post_init__(self) -> None:
        if self.kind != HEALTHY and not self.layers:
            raise ValueError(f"a broken expectation ({self.kind!r}) needs `layers` patterns, got {self.layers!r}.")
        if self.onset < 0:
            raise ValueError(f"`onset` must be a step >= 0, got {self.onset!r}.")

    @property
    def healthy(self) -> bool:
        """Whether the run is expected to have no warning."""
        return self.kind == HEALTHY

    @property
    def kinds(self) -> tuple[str, ...]:
        """Finding kinds that count as this expectation's class."""
        return (self.kind, *self.also)

    def describe(self) -> str:
        """One cell for the table, e.g. ``exploding|non_finite @ * from step 0``."""
        if self.healthy:
            return HEALTHY
        return f"{'|'.join(self.kinds)} @ {','.join(self.layers)} from step {self.onset}"


@dataclass(frozen=True)
class Verdict:
    """The score of one run.

    Attributes:
        passed: Whether the run meets its target.
        reason: Why not (or what matched), in words.
        warnings: Warning-level findings per kind.
        notes: Note-level findings per kind.
        kind: Kind of the finding shown (the matching one, else the closest candidate, else the first warning).
        layer: Its layer.
        step: Its first step (the condition's onset as the diagnosis saw it).
        reported_step: The logged step it was reported at.
        listed: ``kind@layer[severity]`` of every finding, in report order.
    """

    passed: bool
    reason: str
    warnings: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    kind: str | None = None
    layer: str | None = None
    step: int | None = None
    reported_step: int | None = None
    listed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Streams:
    """The logged steps of each optimizer, and which optimizer owns each layer.

    Attributes:
        steps: Per optimizer, the logged steps at which it stepped, ascending.
        owner: Full layer name -> index of its optimizer in ``steps``.

    Example:
        >>> streams = Streams(((0, 2, 4), (1, 3, 5)), {"m.g": 0, "m.d": 1})
        >>> streams.of(["m.g"], 4), streams.of(["__global__"], 3)
        ((0, 2, 4), (1, 3, 5))
        >>> streams.within(["m.g"], onset=0, reported=4, tolerance=2), streams.last(["m.g"], onset=0, tolerance=1)
        (True, 2)
    """

    steps: tuple[tuple[int, ...], ...]
    owner: Mapping[str, int] = field(default_factory=dict, hash=False)

    def of(self, named: list[str], reported: int) -> tuple[int, ...]:
        """The steps of the optimizer that owns the first of ``named`` it knows; for a finding on no layer of
        an optimizer (``__global__``), of the optimizer that stepped at ``reported``."""
        for name in named:
            if name in self.owner:
                return self.steps[self.owner[name]]
        return next((steps for steps in self.steps if reported in steps), ())

    def within(self, named: list[str], onset: int, reported: int, tolerance: int) -> bool:
        """Whether ``reported`` is at ``onset`` or later, with at most ``tolerance`` of the owner's logged steps
        from ``onset`` on before it."""
        own = self.of(named, reported)
        return reported >= onset and sum(onset <= s < reported for s in own) <= tolerance

    def last(self, named: list[str], onset: int, tolerance: int, reported: int = -1) -> int | None:
        """The latest step :meth:`within` accepts (``None`` when the owner took no step from ``onset`` on)."""
        after = [s for s in self.of(named, reported) if s >= onset]
        return after[min(tolerance, len(after) - 1)] if after else None


def with_severity(findings: pd.DataFrame) -> pd.DataFrame:
    """``findings`` with a ``severity`` column: missing column or value -> ``"warning"``.

    Raises:
        ValueError: If a severity is neither ``"warning"`` nor ``"note"``.

    Example:
        >>> with_severity(pd.DataFrame({"kind": ["dormant"]})).severity.tolist()
        ['warning']
    """
    frame = findings.copy()
    if "severity" not in frame.columns:
        frame["severity"] = "warning"
    frame["severity"] = frame["severity"].fillna("warning").astype(str)
    unknown = sorted(set(frame["severity"]) - set(_SEVERITIES))
    if unknown:
        raise ValueError(f"findings have severities {unknown}; valid are {list(_SEVERITIES)}.")
    return frame


def _named(row: Any) -> list[str]:
    """The finding's ``layer`` and its ``layers``."""
    named = [str(row["layer"])]
    extra = row.get("layers")
    if isinstance(extra, (list, tuple)):
        named += [str(name) for name in extra]
    return named


def _layer_matches(row: Any, patterns: tuple[str, ...], prefix: str, first_layer: str | None) -> bool:
    named = _named(row)
    for pattern in patterns:
        if pattern == ANY_LAYER:
            return True
        if pattern == FIRST_LAYER:
            if first_layer is not None and first_layer in named:
                return True
            continue
        if any(fnmatch.fnmatchcase(name, prefix + pattern) for name in named):
            return True
    return False


def score(
    findings: pd.DataFrame,
    expectation: Expectation,
    *,
    first_layer: str | None = None,
    prefix: str = "",
    tolerance: int = TOLERANCE,
    log_every: int = 1,
    streams: Streams | None = None,
) -> Verdict:
    """Score one run's findings against its expectation.

    Args:
        findings: ``gradlight.load_findings(save_dir)`` (columns ``kind, layer, step, reported_step``, optional
            ``layers`` and ``severity``).
        expectation: What the run should produce.
        first_layer: The full name of the first layer in forward order (for :data:`FIRST_LAYER`).
        prefix: Prepended to the expectation's patterns (the attribute under which the model is trained).
        tolerance: Logged steps after the onset within which the finding must be reported.
        log_every: Optimizer steps per logged step.
        streams: The logged steps of each optimizer and the layers each owns: the window is then counted in
            the logged steps of the optimizer that owns the finding's layer (``log_every`` is not used).

    Returns:
        The :class:`Verdict`.

    Raises:
        ValueError: If a non-empty ``findings`` lacks a required column, or on a negative ``tolerance`` or a
            ``log_every`` below 1.

    Example:
        >>> frame = pd.DataFrame([{"kind": "dormant", "layer": "m.fc", "step": 0, "reported_step": 4}])
        >>> score(frame, Expectation("dormant", ("fc",)), prefix="m.").passed
        True
        >>> score(frame, Expectation()).reason
        '1 warning(s): dormant@m.fc'
    """
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0 logged steps, got {tolerance!r}.")
    if log_every < 1:
        raise ValueError(f"`log_every` must be >= 1, got {log_every!r}.")
    missing = [column for column in _REQUIRED if column not in findings.columns]
    if missing and not findings.empty:
        raise ValueError(f"`findings` lacks the columns {missing}; it needs {list(_REQUIRED)} (see load_findings).")
    frame = with_severity(findings.reindex(columns=[*findings.columns, *missing]))
    warning_rows = frame[frame["severity"] == "warning"]
    warnings = dict(Counter(warning_rows["kind"].astype(str)))
    notes = dict(Counter(frame.loc[frame["severity"] == "note", "kind"].astype(str)))
    listed = tuple(f"{r['kind']}@{r['layer']}[{r['severity']}]" for _, r in frame.iterrows())
    counts: dict[str, Any] = {"warnings": warnings, "notes": notes, "listed": listed}

    def shown(row: Any, passed: bool, reason: str) -> Verdict:
        return Verdict(
            passed,
            reason,
            kind=str(row["kind"]),
            layer=str(row["layer"]),
            step=int(row["step"]),
            reported_step=int(row["reported_step"]),
            **counts,
        )

    if expectation.healthy:
        if warning_rows.empty:
            return Verdict(True, f"no warning ({len(frame)} note(s))", **counts)
        first = warning_rows.iloc[0]
        where = ", ".join(f"{r['kind']}@{r['layer']}" for _, r in warning_rows.iterrows())
        return shown(first, False, f"{len(warning_rows)} warning(s): {where}")

    allowed = expectation.tolerance or tolerance
    latest = expectation.onset + allowed * log_every
    candidates = warning_rows[warning_rows["kind"].isin(expectation.kinds)]
    if candidates.empty:
        if warning_rows.empty:
            return Verdict(False, f"no {'/'.join(expectation.kinds)} warning (no warning at all)", **counts)
        return shown(warning_rows.iloc[0], False, f"no {'/'.join(expectation.kinds)} warning")
    layer_ok = candidates.apply(lambda r: _layer_matches(r, expectation.layers, prefix, first_layer), axis=1)
    onset = expectation.onset
    if streams is None:
        reported = candidates["reported_step"].astype(int)
        time_ok = (reported >= onset) & (reported <= latest)
    else:
        time_ok = candidates.apply(
            lambda r: streams.within(_named(r), onset, int(r["reported_step"]), allowed), axis=1
        ).astype(bool)
    both = candidates[layer_ok & time_ok]
    if not both.empty:
        return shown(both.iloc[0], True, "flagged by class, layer and time")
    if layer_ok.any():
        row = candidates[layer_ok].iloc[0]
        at = int(row["reported_step"])
        if streams is not None:
            end = streams.last(_named(row), onset, allowed, at)
            own = f" (its optimizer's {allowed + 1} logged steps from {onset})"
            window = f"{onset}-{end}{own}" if end is not None else f"none: no step of its optimizer from {onset}"
        else:
            window = f"{onset}-{latest}"
        return shown(row, False, f"{'too early' if at < onset else 'too late'}: reported at step {at}, window {window}")
    return shown(candidates.iloc[0], False, f"wrong layer: {candidates.iloc[0]['layer']}")
