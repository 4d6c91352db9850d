"""The textbook study over several seeds: a verdict per claim only where every seed agrees.

Each seed's study is an ordinary run (``python -m casestudies.textbook --out OUT/seed-<s> --set seed=<s>``,
its own ``summary.csv``). :func:`agree` lines the claims up by experiment and claim text and gives each one
verdict: the shared class when all seeds reached it, otherwise ``depends on the seed`` with the count of
each class (``holds 2 of 3 (seeds 0, 2), does not hold 1 of 3 (seed 1)``). A seed that lacks a claim
counts as missing, never as agreeing.

Launch (after the per-seed runs)::

    python -m casestudies.textbook.seeds OUT --seeds 0,1,2     # writes OUT/seeds_summary.csv and .md

Example:
    >>> rows = pd.DataFrame({"seed": [0, 1, 2], "experiment": ["recurrent"] * 3, "claim": ["c"] * 3,
    ...                      "verdict_class": ["holds", "holds", "does not hold"], "measured": ["a", "b", "c"]})
    >>> agree(rows, seeds=[0, 1, 2]).loc[0, "verdict"]
    'depends on the seed: holds 2 of 3 (seeds 0, 1), does not hold 1 of 3 (seed 2)'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from casestudies.textbook.common import VERDICT_CLASSES, write_table

#: The verdict of a claim whose seeds disagree starts with this.
DEPENDS = "depends on the seed"


def load_seed_claims(out: Path, seeds: Sequence[int]) -> pd.DataFrame:
    """Every seed's ``OUT/seed-<s>/summary.csv`` rows with a ``seed`` column (absent seeds contribute none)."""
    frames = []
    for seed in seeds:
        path = Path(out) / f"seed-{seed}" / "summary.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(seed=seed))
    if not frames:
        return pd.DataFrame(columns=["seed", "experiment", "claim", "verdict_class", "measured"])
    return pd.concat(frames, ignore_index=True)


def agree(rows: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """One row per claim: the verdict all seeds share, or ``depends on the seed`` with the counts.

    Args:
        rows: Per-seed claim rows (``seed``, ``experiment``, ``claim``, ``verdict_class``, ``measured``).
        seeds: The seeds the study was asked for; a seed without a row for a claim is listed as missing.

    Returns:
        Columns ``experiment``, ``claim``, ``verdict`` (the shared class, or the seed-dependence), ``agreed``
        (bool), ``seeds`` (how many seeds measured it) and ``measured`` (each seed's measurement, ``seed s: ...``
        joined by `` | ``), in the claims' first-seen order.

    Raises:
        ValueError: If ``rows`` lacks a needed column or holds a verdict class outside the three.
    """
    needed = {"seed", "experiment", "claim", "verdict_class", "measured"}
    if not needed <= set(rows.columns):
        raise ValueError(f"rows has columns {sorted(rows.columns)}; it needs {sorted(needed)}")
    unknown = sorted(set(rows["verdict_class"]) - set(VERDICT_CLASSES))
    if unknown:
        raise ValueError(f"verdict classes {unknown} are not valid; use {VERDICT_CLASSES}")
    out = []
    for (experiment, claim), mine in rows.groupby(["experiment", "claim"], sort=False):
        by_seed = dict(zip(mine["seed"].astype(int), mine["verdict_class"]))
        missing = [s for s in seeds if s not in by_seed]
        classes = set(by_seed.values())
        agreed = len(classes) == 1 and not missing
        if agreed:
            verdict = classes.pop()
        else:
            parts = []
            for name in VERDICT_CLASSES:
                having = [s for s in seeds if by_seed.get(s) == name]
                if having:
                    parts.append(f"{name} {len(having)} of {len(seeds)} ({_seeds_text(having)})")
            if missing:
                parts.append(f"missing {len(missing)} of {len(seeds)} ({_seeds_text(missing)})")
            verdict = f"{DEPENDS}: " + ", ".join(parts)
        measured = " | ".join(f"seed {s}: {m}" for s, m in zip(mine["seed"], mine["measured"]))
        out.append(
            {
                "experiment": experiment,
                "claim": claim,
                "verdict": verdict,
                "agreed": agreed,
                "seeds": len(by_seed),
                "measured": measured,
            }
        )
    return pd.DataFrame(out)


def _seeds_text(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.textbook.seeds OUT --seeds 0,1,2``: write ``OUT/seeds_summary.{csv,md}``."""
    parser = argparse.ArgumentParser(prog="python -m casestudies.textbook.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder holding seed-<s>/summary.csv")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} is not valid; give comma-separated integers such as 0,1,2")
    table = agree(load_seed_claims(args.out, seeds), seeds)
    write_table(table, args.out / "seeds_summary")
    agreed = int(table["agreed"].sum()) if len(table) else 0
    print(f"{agreed} of {len(table)} claims have one verdict over seeds {args.seeds}")
    print(table[["experiment", "verdict", "claim"]].to_string(index=False, max_colwidth=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
