"""Step by step: where do the Lightning ``intact`` run and the Ultralytics baseline first differ?

Both runs of one grid start from the same initial weights (:func:`~casestudies.detection.module.build_detector`
with the same seed) and gradlight records both with the same layer names, so their histories line up step by
step and layer by layer. With augmentation off and one batch holding the whole training set (``--batch`` =
the number of training images), both trainers also see the same images at every step (the loss and the
BatchNorm statistics do not depend on the order inside a batch), so any difference comes from the recipe.
Quantities, in the order one step makes them: the training loss, each layer's gradient (``grad_l2``, before
clipping), each layer's step over its weights (``update_ratio``: learning rate, momentum, weight decay, bias
warm-up and clipping together) and its weights (``param_l2``). A recipe difference shows as an update that
differs more than the gradient it was made from; rounding (the two trainers sum in different orders) starts
below 1e-6 and grows step by step::

    scripts/ablate_detector.sh --preset smoke --variants intact,ultralytics --no-augment --batch 32 \\
        --epochs 4 --out /tmp/cmp
    python -m casestudies.detection.compare_trainers /tmp/cmp --rtol 1e-3

Example:
    >>> a = pd.DataFrame({"step": [0, 0], "layer": ["x", "y"], "metric": ["grad_l2"] * 2, "value": [1.0, 2.0]})
    >>> b = a.assign(value=[1.0, 2.1])
    >>> table = step_differences(a, b)
    >>> row = first_difference(table, rtol=1e-3)
    >>> int(row["step"]), row["quantity"], row["layer"]
    (0, 'grad_l2', 'y')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["QUANTITIES", "compare_runs", "first_difference", "step_differences"]

#: Per-step quantities in the order a step makes them (the global ``loss`` first).
QUANTITIES: tuple[str, ...] = ("loss", "grad_l2", "update_ratio", "param_l2")


def step_differences(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Relative difference of every (step, quantity, layer) recorded by both histories.

    Args:
        first: A gradlight history frame (``step``, ``layer``, ``metric``, ``value``).
        second: The other run's history frame.

    Returns:
        ``step``, ``quantity``, ``layer``, ``first``, ``second``, ``rel_diff`` (``|a - b| / max(|a|, |b|)``),
        ordered by step, then :data:`QUANTITIES`, then layer depth order as recorded.
    """
    keys = ["step", "metric", "layer"]
    a = first[first["metric"].isin(QUANTITIES)][[*keys, "value"]]
    b = second[second["metric"].isin(QUANTITIES)][[*keys, "value"]]
    merged = a.merge(b, on=keys, suffixes=("_first", "_second"))
    one, two = merged["value_first"].to_numpy(float), merged["value_second"].to_numpy(float)
    scale = np.maximum(np.abs(one), np.abs(two))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, np.abs(one - two) / scale, 0.0)
    order = {name: i for i, name in enumerate(QUANTITIES)}
    table = pd.DataFrame(
        {
            "step": merged["step"].astype(int),
            "quantity": merged["metric"],
            "layer": merged["layer"],
            "first": one,
            "second": two,
            "rel_diff": rel,
            "_order": merged["metric"].map(order),
            "_row": np.arange(len(merged)),
        }
    )
    return table.sort_values(["step", "_order", "_row"]).drop(columns=["_order", "_row"]).reset_index(drop=True)


def first_difference(table: pd.DataFrame, rtol: float) -> pd.Series | None:
    """The first row of :func:`step_differences` whose relative difference exceeds ``rtol``; ``None`` if none.

    Raises:
        ValueError: If ``rtol`` is negative.
    """
    if not rtol >= 0:
        raise ValueError(f"rtol={rtol!r} is not valid; it must be 0 or more")
    above = table[table["rel_diff"] > rtol]
    return None if above.empty else above.iloc[0]


def compare_runs(grid: Path, first: str = "intact", second: str = "ultralytics") -> pd.DataFrame:
    """:func:`step_differences` of two runs of the grid in ``grid`` (``OUT/runs/<name>/gradlight``)."""
    from gradlight import load_history

    histories = [load_history(Path(grid) / "runs" / name / "gradlight") for name in (first, second)]
    return step_differences(*histories)


def per_step(table: pd.DataFrame) -> pd.DataFrame:
    """The largest relative difference per step and quantity (a one-screen summary)."""
    return table.pivot_table(index="step", columns="quantity", values="rel_diff", aggfunc="max")


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.detection.compare_trainers OUT``; 1 when a quantity differs beyond ``--rtol``."""
    parser = argparse.ArgumentParser(prog="python -m casestudies.detection.compare_trainers")
    parser.add_argument("grid", type=Path, help="a grid folder holding runs/intact and runs/ultralytics")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default: %(default)s)")
    args = parser.parse_args(argv)
    table = compare_runs(args.grid)
    print(per_step(table).to_string(float_format=lambda v: f"{v:.2e}"))
    first = first_difference(table, args.rtol)
    if first is None:
        print(f"no quantity differs by more than {args.rtol:g}")
        return 0
    print(
        f"first difference beyond {args.rtol:g}: step {first['step']}, {first['quantity']} of {first['layer']}: "
        f"{first['first']:.6g} (intact) vs {first['second']:.6g} (ultralytics), {first['rel_diff']:.2e}"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
