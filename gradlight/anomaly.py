"""What a recorder does about new warning findings: warn, stop the run or raise, agreed across ranks.

:class:`AnomalyPolicy` first decides (:meth:`AnomalyPolicy.decide`, pure, like Lightning
``EarlyStopping._evaluate_stopping_criteria``), then agrees the decision across ranks
(:meth:`AnomalyPolicy.agree`, one all-reduce, like ``reduce_boolean_decision``), then acts
(:meth:`AnomalyPolicy.act`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from gradlight.collectives import Collectives
from gradlight.diagnosis.finding import GradientAnomalyError
from gradlight.records import Finding

__all__ = ["AnomalyPolicy", "Decision"]


@dataclass(frozen=True)
class Decision:
    """What to do about one step's findings.

    Attributes:
        findings: Every finding of the step (warnings and notes).
        warn: The warning findings to warn about (action ``"warn"`` or ``"stop"``; rank zero warns).
        to_raise: The warning findings whose action is ``"raise"``.
        to_stop: The warning findings whose action is ``"stop"``.
        raise_: Raise :class:`gradlight.GradientAnomalyError` (after :meth:`AnomalyPolicy.agree`: on any rank).
        stop: Stop the run (after :meth:`AnomalyPolicy.agree`: on any rank).
    """

    findings: tuple[Finding, ...] = ()
    warn: tuple[Finding, ...] = ()
    to_raise: tuple[Finding, ...] = ()
    to_stop: tuple[Finding, ...] = ()
    raise_: bool = False
    stop: bool = False

    @property
    def actionable(self) -> list[Finding]:
        """The warning findings of the step (notes are only recorded)."""
        return [finding for finding in self.findings if finding.is_warning]


class AnomalyPolicy:
    """Warns, stops or raises for new warning findings, one action per finding kind.

    Args:
        actions: ``kind -> "warn" | "raise" | "stop" | "ignore"`` (from :func:`gradlight.diagnosis.resolve_actions`).
        collectives: Cross-process operations: rank zero warns; raise and stop decisions are summed over ranks.
        warn: Called with the text of each warning on rank zero; ``None`` uses :func:`warnings.warn`.

    Example:
        >>> from gradlight.diagnosis import resolve_actions
        >>> policy = AnomalyPolicy(resolve_actions({"non_finite": "stop"}), Collectives())
        >>> finding = Finding("non_finite", "fc", 3, 3, "NaN in fc", "an overflow", "lower the learning rate")
        >>> decision = policy.decide([finding])
        >>> decision.stop, decision.raise_
        (True, False)
    """

    def __init__(
        self,
        actions: Mapping[str, str],
        collectives: Collectives,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.actions = dict(actions)
        self.collectives = collectives
        self._warn = warn
        #: Set when a finding's action is ``"stop"``: a loop that honours it ends the run.
        self.should_stop = False

    def decide(self, findings: Iterable[Finding], final: bool = False) -> Decision:
        """What this rank would do about ``findings`` (pure: nothing is warned, raised or stopped).

        Args:
            findings: The step's findings.
            final: The run is ending (or an exception is under way): warn only, never raise or stop.
        """
        findings = tuple(findings)
        actionable = [f for f in findings if f.is_warning]
        warn = tuple(f for f in actionable if self.actions[f.kind] in ("warn", "stop"))
        if final:
            return Decision(findings, warn)
        to_raise = tuple(f for f in actionable if self.actions[f.kind] == "raise")
        to_stop = tuple(f for f in actionable if self.actions[f.kind] == "stop")
        return Decision(findings, warn, to_raise, to_stop, bool(to_raise), bool(to_stop))

    def agree(self, decision: Decision, device: torch.device | None = None) -> Decision:
        """``decision`` with any rank's raise or stop made every rank's (one all-reduce; every rank calls it).

        No collective in a single process, or when no kind's action is ``"raise"`` or ``"stop"``.
        """
        coll = self.collectives
        if coll.all_reduce_sum is None or not any(a in ("raise", "stop") for a in self.actions.values()):
            return decision
        # Like EarlyStopping's reduce_boolean_decision: any rank's decision is every rank's (one op).
        local = torch.tensor([float(decision.raise_), float(decision.stop)], device=device)
        flags = coll.all_reduce_sum(local)
        return replace(decision, raise_=bool(flags[0].item() > 0), stop=bool(flags[1].item() > 0))

    def act(self, decision: Decision, step: int, flush: Callable[[], None]) -> None:
        """Warn (rank zero), then raise or stop as decided; ``flush`` runs first so the history is on disk.

        Raises:
            GradientAnomalyError: If the decision is to raise.
        """
        if self.collectives.is_global_zero:
            for finding in decision.warn:
                self._emit(f"gradlight: {finding.message}. Likely cause: {finding.cause}. Remedy: {finding.remedy}.")
        if not (decision.raise_ or decision.stop):
            return
        flush()  # the history up to this step is on disk before the run stops
        if decision.raise_:
            raise GradientAnomalyError(list(decision.to_raise) or decision.actionable or list(decision.findings))
        self.should_stop = True
        if self.collectives.is_global_zero:
            kinds = ", ".join(sorted({f.kind for f in decision.to_stop})) or "a finding on another rank"
            # The step after the reported one is the first not taken (Lightning's `global_step` at this point).
            self._emit(f"gradlight: stopping the run at step {step + 1} ({kinds}).")

    def _emit(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=5)
