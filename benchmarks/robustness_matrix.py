"""The full robustness matrix: every parameter kind x loop shape x precision, checked against its invariants.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.robustness_matrix            # everything, prints a table
    python -m benchmarks.robustness_matrix --kinds sparse,complex --loops one_optimizer --csv out.csv

See ``benchmarks/robustness/matrix.py`` for the invariants and ``docs/robustness.md`` for the last result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from benchmarks.robustness.kinds import KINDS
from benchmarks.robustness.loops import LOOPS
from benchmarks.robustness.matrix import Case, run_case, table
from benchmarks.robustness.precision import PRECISIONS


def _names(value: str | None, known: dict[str, object], flag: str) -> list[str]:
    if value is None:
        return list(known)
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; known: {sorted(known)}")
    return names


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", help=f"comma-separated subset of {sorted(KINDS)}")
    parser.add_argument("--loops", help=f"comma-separated subset of {sorted(LOOPS)}")
    parser.add_argument("--precisions", help=f"comma-separated subset of {sorted(PRECISIONS)}")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [
        Case(kind, loop, precision)
        for kind in _names(args.kinds, KINDS, "--kinds")  # type: ignore[arg-type]
        for loop in _names(args.loops, LOOPS, "--loops")  # type: ignore[arg-type]
        for precision in _names(args.precisions, PRECISIONS, "--precisions")  # type: ignore[arg-type]
    ]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="gradlight-robustness-") as root:
        for number, case in enumerate(cases, start=1):
            outcome = run_case(case, Path(root))
            outcomes.append(outcome)
            print(f"[{number}/{len(cases)}] {case.id}: {outcome.status} ({outcome.seconds:.1f} s)", flush=True)
    frame = table(outcomes)
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    _print_summary(frame)
    return frame


def _print_summary(frame: pd.DataFrame) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit or '?'}, torch {torch.__version__}, {len(frame)} cases")
    print(frame["status"].value_counts().to_string())
    pivot = frame.assign(cell=frame.status.str.slice(0, 4)).pivot_table(
        index="kind", columns=["loop", "precision"], values="cell", aggfunc="first"
    )
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(pivot.to_string())
    bad = frame[~frame.status.isin(["pass"])]
    if not bad.empty:
        with pd.option_context("display.max_colwidth", 160, "display.width", 250):
            print("\n" + bad[["kind", "loop", "precision", "status", "problem"]].to_string(index=False))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
