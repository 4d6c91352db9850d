"""The robustness matrix: every kind x loop shape x precision, run and checked against invariants.

The invariants need no hand-computed expectation:

- **no exception** from gradlight (a case whose bare setup, without gradlight, also fails is ``n/a``);
- **every logged step exactly once**: the history's ``grad_l2`` rows hold each step ``0, n, 2n, ...`` below
  the number of optimizer steps taken once per layer, also after a kill and a resume;
- **every layer's** ``grad_l2`` **equals an independent reference** (the same layers, values to 1e-4;
  :func:`benchmarks.robustness.harness.gradient_squares`);
- **the diagnosis is right**: a healthy case reports no warning finding, a faulty kind exactly its faults.

Used by ``tests/benchmarks/test_robustness_matrix.py`` (the fast slice) and
``python -m benchmarks.robustness_matrix`` (everything).
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.robustness.harness import Run, quiet
from benchmarks.robustness.kinds import KINDS
from benchmarks.robustness.loops import LOOPS
from benchmarks.robustness.precision import PRECISIONS
from gradlight import load_findings, load_history

INTERVAL = 3
RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    """One combination: a kind, a loop shape, a precision."""

    kind: str
    loop: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.loop}-{self.precision}"

    @classmethod
    def parse(cls, case_id: str) -> Case:
        kind, loop, precision = case_id.split("-")
        return cls(kind, loop, precision)


@dataclass
class Outcome:
    """What running one case showed: ``status`` is ``pass``, ``fail`` (an invariant), ``error`` or ``n/a``."""

    case: Case
    status: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logged_steps: int = 0


def all_cases() -> list[Case]:
    """Every kind x loop x precision of the registries."""
    return [Case(*combo) for combo in itertools.product(KINDS, LOOPS, PRECISIONS)]


def run_case(case: Case, root: Path) -> Outcome:
    """Run ``case`` in a new folder under ``root`` and check every invariant."""
    kind, loop, precision = KINDS[case.kind], LOOPS[case.loop], PRECISIONS[case.precision]
    run = Run(root / case.id, INTERVAL)
    start = time.perf_counter()
    try:
        with quiet():
            loop.fn(kind, precision, run, True)
    except Exception as error:  # any exception is the finding
        seconds = time.perf_counter() - start
        bare = _bare_failure(case, root)
        if bare is not None:
            return Outcome(case, "n/a", [f"fails without gradlight too: {bare}"], seconds)
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
        return Outcome(case, "error", [message], seconds)
    seconds = time.perf_counter() - start
    problems = check(run, kind.expect)
    return Outcome(case, "fail" if problems else "pass", problems, seconds, len(run.references))


def _bare_failure(case: Case, root: Path) -> str | None:
    """Why the case fails with the recorder off (``None`` when it trains): torch itself does not support it."""
    run = Run(root / f"{case.id}-bare", INTERVAL)
    try:
        with quiet():
            LOOPS[case.loop].fn(KINDS[case.kind], PRECISIONS[case.precision], run, False)
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:120]}"
    return None


def check(run: Run, expect: frozenset[str]) -> list[str]:
    """Every invariant broken by ``run`` (an empty list when all hold)."""
    problems: list[str] = []
    try:
        history = load_history(run.save_dir, metrics=["grad_l2"])
    except FileNotFoundError as error:
        return [f"no history: {error}"]
    history = history[history.layer != "__global__"]
    expected_steps = {step for step in run.logged if step < run.steps}
    steps = set(history.step.unique().tolist())
    if steps != expected_steps:
        missing, extra = sorted(expected_steps - steps), sorted(steps - expected_steps)
        problems.append(f"logged steps: missing {missing}, unexpected {extra}")
    repeated = history[history.duplicated(["step", "layer"], keep=False)]
    if not repeated.empty:
        problems.append(f"rows recorded twice: {sorted(set(zip(repeated.step, repeated.layer)))[:4]}")
    problems += _compare(history, run)
    try:  # the durable record: what a killed run reported before its checkpoint is there too
        findings = load_findings(run.save_dir)
    except FileNotFoundError as error:
        return [*problems, f"no findings file: {error}"]
    warnings_found = set(findings[findings.severity == "warning"].kind)
    if warnings_found != set(expect):
        problems.append(f"warning findings {sorted(warnings_found)}, expected {sorted(expect)}")
    return problems


def _compare(history: pd.DataFrame, run: Run) -> list[str]:
    """Each logged step's layers and ``grad_l2`` against the independent reference."""
    problems: list[str] = []
    for step, reference in sorted(run.references.items()):
        rows = history[history.step == step]
        recorded = dict(zip(rows.layer, rows.value))
        if set(recorded) != set(reference):
            problems.append(f"step {step}: layers {sorted(recorded)} recorded, {sorted(reference)} have a gradient")
            continue
        for layer, squares in reference.items():
            expected = math.sqrt(squares)
            if not math.isclose(recorded[layer], expected, rel_tol=RTOL, abs_tol=1e-7):
                problems.append(f"step {step} {layer}: grad_l2 {recorded[layer]:.6g}, reference {expected:.6g}")
    return problems[:6]


def run_all(cases: Iterable[Case], root: Path) -> list[Outcome]:
    """Run ``cases`` one after the other."""
    return [run_case(case, root) for case in cases]


def table(outcomes: list[Outcome]) -> pd.DataFrame:
    """One row per case: kind, loop, precision, status, seconds, first problem."""
    return pd.DataFrame(
        {
            "kind": [o.case.kind for o in outcomes],
            "loop": [o.case.loop for o in outcomes],
            "precision": [o.case.precision for o in outcomes],
            "status": [o.status for o in outcomes],
            "seconds": [round(o.seconds, 2) for o in outcomes],
            "problem": [o.problems[0][:160] if o.problems else "" for o in outcomes],
        }
    )
