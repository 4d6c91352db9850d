"""Check a finished grid against a published aggregate: is every cell inside its published seed range?

A published table is an aggregate (``aggregate.csv`` of a ``--seeds`` grid: ``<metric>_min``/``_max`` per
variant). A re-run grid (``OUT/per_seed.csv`` of a multi-seed grid, or ``OUT/summary.csv`` of a single-seed
one) passes when each of its runs' values, at the digits the table prints, lies in ``[min, max]``: a
single-seed table (``min == max``) must be reproduced to the printed digit::

    scripts/ablate_detector.sh --preset smoke --out /tmp/smoke --verify docs/case_study/smoke_aggregate.csv
    python -m casestudies.detection.verify docs/case_study/seeds_aggregate.csv /tmp/seeds   # reads only

It prints one line per cell and returns 1 when a cell is outside its range (or nothing could be compared).

Example:
    >>> published = pd.DataFrame({"variant": ["intact"], "map50_95_min": [0.180], "map50_95_max": [0.201]})
    >>> rows = pd.DataFrame({"variant": ["intact"], "status": ["done"], "map50_95": [0.2012]})
    >>> [(c.variant, c.metric, c.inside) for c in compare(published, rows)]
    [('intact', 'map50_95', True)]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["CHECKED", "Cell", "compare", "format_cells", "load_runs", "main", "verify"]

#: Aggregate metric -> (summary column, log10 first, printed format): the published tables' digits.
CHECKED: dict[str, tuple[str, bool, str]] = {
    "map50_95": ("map50_95", False, "{:.3f}"),
    "map50": ("map50", False, "{:.3f}"),
    "grad_decades": ("grad_ratio_early_late", True, "{:.2f}"),
    "first_layer_grad_l2": ("first_layer_grad_l2", False, "{:.3g}"),
    "final_train_loss": ("final_train_loss", False, "{:.3f}"),
}


@dataclass(frozen=True)
class Cell:
    """One run's value of one metric against its published range (all at the printed digits)."""

    variant: str
    seed: str
    metric: str
    value: float
    low: float
    high: float

    @property
    def inside(self) -> bool:
        """Whether the value, as printed, lies in the published ``[min, max]``, as printed."""
        return self.low <= self.value <= self.high


def _printed(value: float, number: str) -> float:
    return float(number.format(value)) if math.isfinite(value) else value


def _decades(value: float) -> float:
    if value == 0.0:
        return float("-inf")
    return math.log10(value) if value > 0 else float("nan")


def compare(published: pd.DataFrame, rows: pd.DataFrame) -> list[Cell]:
    """Every finished run's cells of every metric that ``published`` has a range for.

    Args:
        published: An aggregate (``variant``, ``<metric>_min``, ``<metric>_max``).
        rows: Run rows (``variant``, ``status``, summary columns; ``seed`` when there are several seeds).
    """
    cells: list[Cell] = []
    ranges = published.set_index("variant")
    done = rows[rows["status"] == "done"] if "status" in rows.columns else rows
    for _, row in done.iterrows():
        variant = str(row["variant"])
        if variant not in ranges.index:
            continue
        for metric, (column, log, number) in CHECKED.items():
            if f"{metric}_min" not in ranges.columns or column not in row.index:
                continue
            value = _decades(float(row[column])) if log else float(row[column])
            low = _printed(float(ranges.loc[variant, f"{metric}_min"]), number)
            high = _printed(float(ranges.loc[variant, f"{metric}_max"]), number)
            if not (math.isfinite(low) and math.isfinite(high)):
                continue
            seed = str(int(row["seed"])) if "seed" in row.index and pd.notna(row["seed"]) else "-"
            cells.append(Cell(variant, seed, metric, _printed(value, number), low, high))
    return cells


def load_runs(out: Path) -> pd.DataFrame:
    """A grid's run rows: ``per_seed.csv`` of a multi-seed grid, else ``summary.csv``.

    Raises:
        FileNotFoundError: If ``out`` has neither (the grid never finished).
    """
    for name in ("per_seed.csv", "summary.csv"):
        if (Path(out) / name).exists():
            return pd.read_csv(Path(out) / name)
    raise FileNotFoundError(f"out={str(out)!r} has no per_seed.csv or summary.csv; run or --summarize-only it first")


def format_cells(cells: list[Cell]) -> str:
    """One line per cell: variant, seed, metric, value, published range, ``ok`` or ``OUTSIDE``."""
    lines = [f"{'variant':<18} {'seed':>4}  {'metric':<20} {'value':>10}  published [min, max]"]
    for cell in cells:
        number = CHECKED[cell.metric][2]
        verdict = "ok" if cell.inside else "OUTSIDE"
        lines.append(
            f"{cell.variant:<18} {cell.seed:>4}  {cell.metric:<20} {number.format(cell.value):>10}  "
            f"[{number.format(cell.low)}, {number.format(cell.high)}]  {verdict}"
        )
    return "\n".join(lines)


def verify(published_csv: Path, out: Path) -> int:
    """Print the grid in ``out`` cell by cell against ``published_csv``; 0 when all are inside, else 1."""
    published, rows = pd.read_csv(published_csv), load_runs(out)
    cells = compare(published, rows)
    print(f"verify {out} against {published_csv}:")
    print(format_cells(cells))
    outside = [cell for cell in cells if not cell.inside]
    if not cells:
        print("nothing to compare: no finished run of a published variant", file=sys.stderr)
        return 1
    print(f"{len(cells) - len(outside)}/{len(cells)} cells inside their published range")
    return 1 if outside else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.detection.verify PUBLISHED OUT``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m casestudies.detection.verify", description=__doc__.split("\n")[0])
    parser.add_argument("published", type=Path, help="published aggregate CSV (docs/case_study/*_aggregate.csv)")
    parser.add_argument("out", type=Path, help="a finished grid's folder (per_seed.csv or summary.csv)")
    args = parser.parse_args(argv)
    for name, path in (("published", args.published), ("out", args.out)):
        if not path.exists():
            print(f"verify: error: {name}={str(path)!r} does not exist", file=sys.stderr)
            return 2
    try:
        return verify(args.published, args.out)
    except FileNotFoundError as error:  # a folder without a finished grid's summary
        print(f"verify: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
