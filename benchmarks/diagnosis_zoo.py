"""The diagnosis benchmark: real architectures, healthy and broken on purpose, scored against gradlight's findings.

    OMP_NUM_THREADS=1 python benchmarks/diagnosis_zoo.py                  # 59 runs, 6-17 min on one shared core
    OMP_NUM_THREADS=1 python benchmarks/diagnosis_zoo.py --quick          # the test's 16 runs, 3-4 min
    python benchmarks/diagnosis_zoo.py --only 'hf_*' --out /tmp/zoo --json zoo.json

Trains each run of :data:`zoo.catalog.CATALOG` (torchvision, timm, Hugging Face transformers built from
configs, Lightning's demo Transformer, LSTM/GRU/RNN nets, Ultralytics YOLO and a GAN trained under manual
optimization with two optimizers; nothing downloads) for 16-1400 optimizer steps on synthetic data with a
learnable signal, with ``GradientFlowMonitor(log_every_n_steps=1)`` in a Lightning ``Trainer``, reads
``gradlight.load_findings`` and scores it (:func:`zoo.scoring.score`):

* a healthy run passes with zero warning-level findings (notes are listed, and allowed);
* a broken run passes when a warning of its class names the faulty layer (or the first layer) within 5
  logged steps of the fault's onset (with several optimizers, 5 logged steps of the optimizer that owns it).

Each run is also checked without the diagnosis (``check`` column): a healthy run trains (its loss falls; a
GAN's samples match the data without a collapse), a broken
run's fault is in effect. It prints one row per run, the totals and the two targets; ``--json`` writes the
same as JSON, ``--out`` keeps every run's folder (history and ``findings.jsonl``) for inspection.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if __name__ == "__main__":  # benchmark the gradlight of this checkout, not whichever one is installed
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import torch
from zoo.catalog import ZooRun, select
from zoo.runner import Outcome, run_one

__all__ = ["main", "outcome_row", "render", "run_zoo", "targets"]

COLUMNS = ("run", "family", "regime", "expected", "warnings", "notes", "named", "onset / reported", "check", "result")


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{kind}x{n}" for kind, n in sorted(counts.items())) or "-"


def outcome_row(outcome: Outcome) -> dict[str, Any]:
    """One table row (and JSON record) for an outcome.

    Example:
        >>> from zoo.catalog import CATALOG
        >>> from zoo.scoring import Verdict
        >>> row = outcome_row(Outcome(CATALOG[0], Verdict(True, "no warning"), True, "loss 2.3 -> 1.1", 4.0))
        >>> row["result"], row["expected"]
        ('pass', 'healthy')
    """
    run, verdict = outcome.run, outcome.verdict
    named = f"{verdict.kind}@{verdict.layer}" if verdict.kind else "-"
    timing = (
        f"{run.expect.onset} / {verdict.reported_step} (from {verdict.step})"
        if verdict.reported_step is not None and not run.expect.healthy
        else (f"- / {verdict.reported_step}" if verdict.reported_step is not None else "-")
    )
    result = "pass" if outcome.passed else ("CRASH" if outcome.error else "FAIL")
    return {
        "run": run.name,
        "family": run.family,
        "regime": run.regime.describe(run.task.networks),
        "expected": run.expect.describe(),
        "warnings": _counts(verdict.warnings),
        "notes": _counts(verdict.notes),
        "named": named,
        "onset / reported": timing,
        "check": "-" if outcome.error else ("ok: " if outcome.check_ok else "NOT IN EFFECT: ") + outcome.check,
        "result": result,
        "reason": verdict.reason,
        "faults": [fault.describe() for fault in run.faults],
        "seconds": round(outcome.seconds, 1),
        "loss_first": outcome.loss_first,
        "loss_last": outcome.loss_last,
        "findings": outcome.findings,
        "error": outcome.error,
    }


def targets(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """The issue's two targets: healthy runs without warnings, broken runs flagged by class, layer and time.

    Example:
        >>> targets([])["healthy"]["met"]
        True
    """
    healthy = [o for o in outcomes if o.run.expect.healthy]
    broken = [o for o in outcomes if not o.run.expect.healthy]
    result = {}
    for key, group, text in (
        ("healthy", healthy, "zero warning-level findings on every healthy run"),
        ("broken", broken, "every broken run flagged by class, layer and time"),
    ):
        passed = sum(o.passed for o in group)
        result[key] = {"target": text, "passed": passed, "runs": len(group), "met": passed == len(group)}
    return result


def render(outcomes: list[Outcome], seconds: float) -> str:
    """The confusion table (pipe table), the totals and the targets, as printed."""
    rows = [outcome_row(o) for o in outcomes]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in rows]
    healthy_warned: Counter[str] = Counter()
    for outcome in outcomes:
        if outcome.run.expect.healthy:
            healthy_warned.update(outcome.verdict.warnings)
    missed = [o for o in outcomes if not o.run.expect.healthy and not o.passed]
    lines += [
        "",
        f"runs: {len(outcomes)} ({sum(o.run.expect.healthy for o in outcomes)} healthy, "
        f"{sum(not o.run.expect.healthy for o in outcomes)} broken) in {seconds:.0f} s; "
        f"crashed: {sum(o.error is not None for o in outcomes)}; "
        f"check not in effect: {sum(not o.check_ok and o.error is None for o in outcomes)}",
        f"warnings on healthy runs by kind: {_counts(dict(healthy_warned))}",
        "broken runs missed: " + (", ".join(f"{o.run.name} ({o.verdict.reason})" for o in missed) or "none"),
        "",
    ]
    for goal in targets(outcomes).values():
        state = "met" if goal["met"] else "missed"
        lines.append(f"target: {goal['target']}: {goal['passed']}/{goal['runs']} ({state})")
    return "\n".join(lines)


def run_zoo(runs: list[ZooRun], root: Path, progress: bool = True) -> list[Outcome]:
    """Train and score ``runs`` one after the other under ``root``."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    outcomes = []
    for index, run in enumerate(runs, start=1):
        outcome = run_one(run, root)
        outcomes.append(outcome)
        if progress:
            result = "pass" if outcome.passed else ("CRASH" if outcome.error else "FAIL")
            print(
                f"[{index}/{len(runs)}] {run.name}: {result} ({outcome.seconds:.1f} s) {outcome.verdict.reason}",
                file=sys.stderr,
                flush=True,
            )
    return outcomes


def _commit() -> str:
    """The checkout's short commit, with ``-dirty`` when its benchmark or gradlight files have changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "../gradlight", ".")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring. Returns 0 when both targets are met, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the quick subset (a few healthy and broken runs)")
    parser.add_argument("--only", metavar="PATTERN", help="only runs whose name matches this fnmatch pattern")
    parser.add_argument("--out", type=Path, help="keep each run's folder here (default: a deleted temp folder)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        runs = select(args.only, quick=args.quick)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradlight-zoo-") as scratch:
        root = args.out if args.out is not None else Path(scratch)
        outcomes = run_zoo(runs, root)
    seconds = time.perf_counter() - start
    command = "python benchmarks/diagnosis_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command.strip()}  (commit {_commit()}, torch {torch.__version__})\n")
    print(render(outcomes, seconds))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command.strip(),
            "commit": _commit(),
            "seconds": round(seconds, 1),
            "runs": [outcome_row(o) for o in outcomes],
            "targets": targets(outcomes),
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    return 0 if all(goal["met"] for goal in targets(outcomes).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
