"""Published benchmarks of buggy training programs, re-implemented in PyTorch, diagnosed by gradlight.

    OMP_NUM_THREADS=1 python -m benchmarks.buggy_programs                      # every ported program
    OMP_NUM_THREADS=1 python -m benchmarks.buggy_programs --only 'AUTOTRAINER/*' --json out.json

Trains every program of :data:`benchmarks.buggy.programs.PROGRAMS` (TheDeepChecker's synthetic faults,
AUTOTRAINER's Circle/Blob models, DeepLocalize's Stack Overflow pairs; each buggy program beside its
correct twin) in a plain PyTorch loop with ``GradientFlowRecorder(log_every_n_steps=1,
track_activations=True)``, and prints:

* one row per program: the warnings, the finding that detects it (kind@layer, step of its report), and
  what the published tools reported on the same program where that could be found;
* one row per fault class: detected / total, with the faulty layer named, warnings on the correct twins;
* overall recall and precision (definitions in :func:`overall`), on every program and on those whose
  symptom is in the gradients, updates or activations (``scope == "gradients"``), beside the published
  figures (:mod:`benchmarks.buggy.published`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from benchmarks.buggy.programs import NOT_PORTED, Program, select
from benchmarks.buggy.published import OVERALL, SOURCES, published_for
from benchmarks.buggy.runner import Alarm, GradlightObserver, Result, judge, matches, train

__all__ = ["Verdict", "main", "overall", "render", "verdict"]


@dataclass(frozen=True)
class Verdict:
    """gradlight's result on one program.

    Attributes:
        program: The program.
        warnings: ``kind@layer`` of every warning, in report order.
        hit: The warning that detects the fault (buggy) or the first false alarm (correct), else ``None``.
        placed: Whether a detecting warning names the faulty layer.
        error: The crash, if any.
        seconds: Wall time.
    """

    program: Program
    warnings: tuple[str, ...]
    hit: Alarm | None
    placed: bool
    error: str | None
    seconds: float

    @property
    def detected(self) -> bool:
        """A buggy program with a warning of an accepted kind."""
        return not self.program.healthy and self.hit is not None

    @property
    def kinds(self) -> set[str]:
        """Distinct warning kinds reported."""
        return {w.split("@")[0] for w in self.warnings}

    @property
    def false_alarms(self) -> tuple[str, ...]:
        """A correct program's warnings other than its established true findings (``()`` for a buggy one)."""
        if not self.program.healthy:
            return ()
        return tuple(w for w in self.warnings if not matches(w, self.program.true_findings))

    @property
    def true_kinds(self) -> set[str]:
        """Distinct warning kinds on a correct program that are its established true findings."""
        true = set(self.warnings) - set(self.false_alarms) if self.program.healthy else set()
        return {w.split("@")[0] for w in true}


def verdict(program: Program, result: Result, seconds: float) -> Verdict:
    """Judge ``result`` against what ``program`` should produce (a correct program's hit: its first false alarm)."""
    alarms = result.alarms
    if program.healthy:
        alarms = [a for a in alarms if not matches(f"{a.kind}@{a.layer}", program.true_findings)]
    hit, placed = judge(alarms, program.kinds, program.layers)
    shown = tuple(f"{a.kind}@{a.layer}" for a in result.alarms if a.severity == "warning")
    return Verdict(program, shown, hit, placed, result.error, seconds)


def overall(verdicts: list[Verdict]) -> dict[str, float]:
    """Recall and precision over ``verdicts``.

    * recall: buggy programs detected (a warning of an accepted kind) / buggy programs; ``recall_layer``
      also needs the faulty layer named;
    * precision: correct reports / all reports, a report being one distinct warning kind on one program
      (a kind accepted for a buggy program is correct; any kind on a correct twin, and an unrelated kind on
      a buggy program, is not; a correct program's established true finding, ``Program.true_findings``, is
      correct). This is our definition: Humbatova et al. score each fault's reported
      causes against its ground truth in the same spirit (fraction of the ground truth found, fraction of
      the reports that are right), but their text with the exact formula was not available here.

    Example:
        >>> overall([])["recall"]
        0.0
    """
    buggy = [v for v in verdicts if not v.program.healthy]
    reports = sum(len(v.kinds) for v in verdicts)
    correct = sum(sum(1 for k in v.kinds if _accepted(v.program, k)) for v in buggy)
    correct += sum(len(v.true_kinds - {w.split("@")[0] for w in v.false_alarms}) for v in verdicts)
    n = max(1, len(buggy))
    return {
        "programs": float(len(buggy)),
        "recall": sum(v.detected for v in buggy) / n,
        "recall_layer": sum(v.detected and v.placed for v in buggy) / n,
        "precision": correct / reports if reports else 0.0,
        "reports": float(reports),
    }


def _accepted(program: Program, kind: str) -> bool:
    return judge([Alarm(kind)], program.kinds, ("*",))[0] is not None


def _row(v: Verdict, twins: dict[str, Verdict]) -> str:
    p = v.program
    if v.error:
        result = f"CRASH {v.error}"
    elif p.healthy:
        result = "FALSE ALARM" if v.false_alarms else ("true finding (see docs)" if v.warnings else "quiet")
    else:
        result = "found, layer named" if v.placed else ("found, other layer" if v.hit else "missed")
    hit = f"{v.hit.kind}@{v.hit.layer} (step {v.hit.step})" if v.hit else "-"
    twin = twins.get(p.twin)
    twin_text = "-" if twin is None else (", ".join(twin.warnings) or "quiet")
    pub = "; ".join(f"{k}: {t}" for k, t in published_for(p.name).items()) or "-"
    cells = [
        p.name,
        p.fault,
        p.scope if not p.healthy else "-",
        result,
        hit,
        ", ".join(v.warnings) or "-",
        twin_text,
        pub,
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def render(verdicts: list[Verdict], seconds: float) -> str:
    """The per-program table, the per-class table, the overall figures and the published ones."""
    twins = {v.program.name: v for v in verdicts if v.program.healthy}
    head = [
        "program",
        "fault class",
        "scope",
        "gradlight",
        "detecting finding",
        "warnings",
        "twin's warnings",
        "published",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(v, twins) for v in verdicts]
    lines += ["", _classes(verdicts, twins), ""]
    for label, group in (
        ("all ported programs", verdicts),
        ("symptom in gradients/updates/activations", [v for v in verdicts if v.program.scope == "gradients"]),
    ):
        o = overall(group)
        lines.append(
            f"{label}: recall {o['recall']:.2f} (layer named {o['recall_layer']:.2f}) over {o['programs']:.0f} buggy "
            f"programs; precision {o['precision']:.2f} over {o['reports']:.0f} reports (twins included)"
        )
    quiet = sum(not v.warnings for v in twins.values())
    clean = sum(not v.false_alarms for v in twins.values())
    established = [v for v in twins.values() if v.warnings and not v.false_alarms]
    true = ", ".join(f"{v.program.name}: {', '.join(v.warnings)}" for v in established)
    lines += [
        f"correct twins without a false alarm: {clean}/{len(twins)}; without any warning: {quiet}/{len(twins)}"
        + (f" (true findings on the published correct program: {true})" if true else "")
        + f"; crashes: {sum(bool(v.error) for v in verdicts)}"
    ]
    lines += ["", "published (not on these exact runs unless a row above says so):"]
    lines += [f"  {tool}: {figure} [{SOURCES.get(src, 'no source')}]" for tool, figure, src in OVERALL]
    lines += ["", "not ported / not run:"] + [f"  {src} {what}: {why}" for src, what, why in NOT_PORTED]
    lines += ["", f"{len(verdicts)} runs in {seconds:.0f} s"]
    return "\n".join(lines)


def _classes(verdicts: list[Verdict], twins: dict[str, Verdict]) -> str:
    groups: dict[tuple[str, str], list[Verdict]] = defaultdict(list)
    for v in verdicts:
        if not v.program.healthy:
            groups[(v.program.source, v.program.fault)].append(v)
    head = [
        "source",
        "fault class",
        "scope",
        "detected/total",
        "layer named",
        "false alarms on twins",
        "kinds",
        "first report step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (source, fault), group in groups.items():
        twin_list = {v.program.twin for v in group}
        alarms = sum(bool(twins[t].false_alarms) for t in twin_list if t in twins)
        kinds = sorted({f"{v.hit.kind}@{v.hit.layer}" for v in group if v.hit})
        steps = [v.hit.step for v in group if v.hit and v.hit.step is not None]
        cells = [
            source,
            fault,
            group[0].program.scope,
            f"{sum(v.detected for v in group)}/{len(group)}",
            f"{sum(v.detected and v.placed for v in group)}/{len(group)}",
            f"{alarms}/{len(twin_list)}",
            ", ".join(kinds) or "-",
            str(min(steps)) if steps else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(programs: list[Program], progress: bool = True) -> list[Verdict]:
    """Train and judge ``programs`` one after the other."""
    out = []
    for index, program in enumerate(programs, start=1):
        start = time.perf_counter()
        result = train(program.build(), GradlightObserver())
        out.append(verdict(program, result, time.perf_counter() - start))
        if progress:
            print(
                f"[{index}/{len(programs)}] {program.name}: {out[-1].warnings or 'quiet'}", file=sys.stderr, flush=True
            )
    return out


def commit() -> str:
    """The checkout's short commit, ``-dirty`` with uncommitted changes under gradlight/ or benchmarks/."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "gradlight", "benchmarks")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _record(v: Verdict) -> dict[str, Any]:
    p = v.program
    return {
        "program": p.name,
        "fault": p.fault,
        "scope": p.scope,
        "healthy": p.healthy,
        "warnings": list(v.warnings),
        "false_alarms": list(v.false_alarms),
        "hit": None if v.hit is None else {"kind": v.hit.kind, "layer": v.hit.layer, "step": v.hit.step},
        "placed": v.placed,
        "error": v.error,
        "seconds": round(v.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="PATTERN", help="programs whose name matches (fnmatch), with their twins")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        programs = select(args.only)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    verdicts = run(programs)
    seconds = time.perf_counter() - start
    command = "python -m benchmarks.buggy_programs " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command.strip()}  (commit {commit()}, torch {torch.__version__})\n")
    print(render(verdicts, seconds))
    if args.json is not None:
        payload = {"command": command.strip(), "commit": commit(), "runs": [_record(v) for v in verdicts]}
        payload["overall"] = overall(verdicts)
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
