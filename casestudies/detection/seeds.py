"""Aggregate a grid trained once per seed: per-seed rows, mean/std/min/max per variant, error-bar plots.

A grid run with ``--seeds 0,1,2`` writes one ordinary grid per seed under ``OUT/seed-<s>/`` (its own
``summary.csv``, plots and report) and, from those, ``OUT/per_seed.csv`` (every seed's rows, with a ``seed``
column), ``OUT/aggregate.csv``/``.json``/``.md`` (one row per variant) and the plots
``OUT/map_vs_grad_ratio.png`` (mean with standard-deviation error bars, every seed as a faint dot) and
``OUT/grad_profiles.png`` (per-block median gradient: geometric mean over seeds, band from the smallest to
the largest seed).

Only finished runs (``status == "done"``) enter the statistics. A seed whose run failed, or whose folder has
no summary at all, is listed in ``missing_seeds`` and not counted in ``n_seeds``: an aggregate over fewer
seeds says so instead of averaging silently. ``std`` is the sample standard deviation (``ddof=1``; NaN with
one seed). The early/late ratio is aggregated in decades (``log10``), as it spans orders of magnitude.

Example:
    >>> rows = pd.DataFrame({"seed": [0, 1], "variant": ["intact"] * 2, "status": ["done"] * 2,
    ...                      "map50_95": [0.2, 0.3]})
    >>> table = aggregate(rows, seeds=[0, 1])
    >>> int(table.loc[0, "n_seeds"]), float(table.loc[0, "map50_95_mean"])
    (2, 0.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from casestudies.detection import summary

#: Aggregated quantities: output name -> (summary column, whether to take log10 first).
METRICS: dict[str, tuple[str, bool]] = {
    "map50_95": ("map50_95", False),
    "map50": ("map50", False),
    "grad_decades": ("grad_ratio_early_late", True),
    "first_layer_grad_l2": ("first_layer_grad_l2", False),
    "final_train_loss": ("final_train_loss", False),
}
STATISTICS = ("mean", "std", "min", "max")
#: Descriptive columns copied from the first seed's row of each variant.
DESCRIPTIVE = ("model", "trainer", "residual", "batchnorm", "activation", "params", "epochs")


def seed_dir(out: Path, seed: int) -> Path:
    """Folder of one seed's grid inside a multi-seed ``out``.

    Example:
        >>> seed_dir(Path("runs/grid"), 2).as_posix()
        'runs/grid/seed-2'
    """
    return Path(out) / f"seed-{seed}"


def load_seed_rows(out: Path, seeds: Sequence[int], variants: Sequence[str]) -> pd.DataFrame:
    """Every seed's summary rows of ``variants``, with a ``seed`` column; absent ones as ``status=missing``.

    A seed whose ``summary.csv`` does not exist (it never reached the end of its grid) or lacks a variant
    contributes a row with ``status == "missing"`` for it, so the aggregate can name it.
    """
    frames = []
    for seed in seeds:
        path = seed_dir(out, seed) / "summary.csv"
        frame = pd.read_csv(path) if path.exists() else pd.DataFrame({"variant": [], "status": []})
        frame = frame[frame["variant"].isin(variants)]
        absent = [v for v in variants if v not in set(frame["variant"])]
        frame = pd.concat([frame, pd.DataFrame({"variant": absent, "status": ["missing"] * len(absent)})])
        frame.insert(0, "seed", seed)
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    order = {name: index for index, name in enumerate(variants)}
    return rows.sort_values(["seed", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c)


def aggregate(rows: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """One row per variant: ``n_seeds``, ``missing_seeds`` and ``<metric>_{mean,std,min,max}``.

    Args:
        rows: Per-seed summary rows; needs ``seed``, ``variant``, ``status`` and the summary columns named in
            :data:`METRICS` (absent metric columns give NaN statistics).
        seeds: The seeds the grid was asked for; a seed without a finished row for a variant is missing.

    Returns:
        Variants in order of first appearance in ``rows``.

    Raises:
        ValueError: If ``rows`` lacks ``seed``, ``variant`` or ``status``.

    Example:
        >>> rows = pd.DataFrame({"seed": [0, 1, 2], "variant": ["a"] * 3, "status": ["done", "done", "failed"],
        ...                      "grad_ratio_early_late": [1e-3, 1e-5, 1.0]})
        >>> row = aggregate(rows, seeds=[0, 1, 2]).iloc[0]
        >>> int(row["n_seeds"]), row["missing_seeds"], float(row["grad_decades_mean"])
        (2, '2', -4.0)
    """
    needed = {"seed", "variant", "status"}
    if not needed <= set(rows.columns):
        raise ValueError(f"rows has columns {sorted(rows.columns)}; it needs at least {sorted(needed)}")
    out = []
    for variant in dict.fromkeys(rows["variant"]):
        mine = rows[rows["variant"] == variant]
        done = mine[mine["status"] == "done"]
        record: dict[str, Any] = {"variant": variant}
        source = done if not done.empty else mine
        for column in DESCRIPTIVE:
            if column in source.columns:
                record[column] = source[column].iloc[0]
        finished = sorted(int(s) for s in done["seed"])
        record["n_seeds"] = len(finished)
        record["seeds"] = ",".join(str(s) for s in finished)
        record["missing_seeds"] = ",".join(str(s) for s in seeds if int(s) not in finished)
        for name, (column, log) in METRICS.items():
            values = done[column].astype(float).to_numpy() if column in done.columns else np.array([])
            if log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = np.log10(values)
            record.update(_statistics(name, values))
        out.append(record)
    return pd.DataFrame(out)


def _statistics(name: str, values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    nan = float("nan")
    if finite.size == 0:
        return {f"{name}_{stat}": nan for stat in STATISTICS}
    return {
        f"{name}_mean": float(finite.mean()),
        f"{name}_std": float(finite.std(ddof=1)) if finite.size > 1 else nan,
        f"{name}_min": float(finite.min()),
        f"{name}_max": float(finite.max()),
    }


def write_aggregate(rows: pd.DataFrame, table: pd.DataFrame, out: Path) -> None:
    """``out/per_seed.csv`` (every seed's rows), ``out/aggregate.csv``/``.json``/``.md`` (one row per variant)."""
    rows.to_csv(Path(out) / "per_seed.csv", index=False)
    table.to_csv(Path(out) / "aggregate.csv", index=False)
    (Path(out) / "aggregate.json").write_text(table.to_json(orient="records", indent=2))
    (Path(out) / "aggregate.md").write_text(markdown_aggregate(table) + "\n")


def ranges_overlap(table: pd.DataFrame, metric: str, first: str, second: str) -> bool:
    """Whether two variants' seed ranges ``[min, max]`` of ``metric`` overlap (no measurable difference).

    Example:
        >>> t = pd.DataFrame({"variant": ["a", "b"], "m_min": [0.1, 0.25], "m_max": [0.2, 0.3]})
        >>> ranges_overlap(t, "m", "a", "b")
        False
    """
    bounds = table.set_index("variant").loc[[first, second], [f"{metric}_min", f"{metric}_max"]]
    values = bounds.to_numpy(dtype=float)
    return bool(values[:, 0].max() <= values[:, 1].min())


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The aggregate for reading: one text cell ``mean ± std [min, max]`` per metric, seeds, missing seeds.

    Example:
        >>> rows = pd.DataFrame({"seed": [0, 1], "variant": ["a", "a"], "status": ["done"] * 2,
        ...                      "map50_95": [0.2, 0.3]})
        >>> display_table(aggregate(rows, [0, 1])).loc[0, "mAP50-95"]
        '0.250 ± 0.071 [0.200, 0.300]'
    """
    shown = {
        "map50_95": ("mAP50-95", "{:.3f}"),
        "map50": ("mAP50", "{:.3f}"),
        "grad_decades": ("early/late (decades)", "{:.2f}"),
        "first_layer_grad_l2": ("first-block grad", "{:.3g}"),
        "final_train_loss": ("final loss", "{:.3f}"),
    }
    frame = pd.DataFrame({"variant": table["variant"], "seeds": table["n_seeds"]})
    for name, (label, number) in shown.items():
        frame[label] = [_cell(row, name, number) for _, row in table.iterrows()]
    frame["missing"] = table["missing_seeds"].replace("", "-")
    return frame


def format_aggregate(table: pd.DataFrame) -> str:
    """The aggregate as a terminal table (see :func:`display_table`)."""
    return display_table(table).to_string(index=False)


def markdown_aggregate(table: pd.DataFrame) -> str:
    """The aggregate as a Markdown table for docs (see :func:`display_table`)."""
    return summary.markdown_table(display_table(table))


def _cell(row: pd.Series, name: str, number: str) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if not np.isfinite(mean):
        return "-"
    spread = number.format(std) if np.isfinite(std) else "-"
    low, high = number.format(row[f"{name}_min"]), number.format(row[f"{name}_max"])
    return f"{number.format(mean)} ± {spread} [{low}, {high}]"


# ---------------------------------------------------------------------------------------------------- plots
def plot_map_vs_ratio(rows: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """mAP50-95 against the early/late ratio in decades: mean ± std per variant, each seed a faint dot."""
    fig, ax = summary.new_figure(7, 4.5)
    done = rows[rows["status"] == "done"]
    for index, (_, row) in enumerate(table.iterrows()):
        x, y = row["grad_decades_mean"], row["map50_95_mean"]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        baseline = row.get("trainer") == "ultralytics"
        color = "black" if baseline else f"C{index % 10}"
        mine = done[done["variant"] == row["variant"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            seed_x = np.log10(mine["grad_ratio_early_late"].astype(float).to_numpy())
        ax.scatter(seed_x, mine["map50_95"], color=color, alpha=0.35, s=18, zorder=2)
        xerr, yerr = np.nan_to_num(row["grad_decades_std"]), np.nan_to_num(row["map50_95_std"])
        ax.errorbar(
            x,
            y,
            xerr=xerr,
            yerr=yerr,
            fmt="*" if baseline else "o",
            color=color,
            markersize=11 if baseline else 7,
            capsize=3,
            zorder=3,
            label=f"{row['variant']} (n={row['n_seeds']})",
        )
    ax.margins(x=0.1, y=0.08)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("early/late gradient ratio, log10 (median, last quarter of training)")
    ax.set_ylabel("mAP50-95 (pycocotools)")
    ax.set_title("Gradient reaching the first layer vs. detection quality (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def finish_seeds(out: Path, seeds: Sequence[int], variants: Sequence[str]) -> pd.DataFrame:
    """Read every seed's summary under ``out``, write the aggregate files and plots; return the aggregate."""
    out = Path(out)
    rows = load_seed_rows(out, seeds, variants)
    table = aggregate(rows, seeds)
    write_aggregate(rows, table, out)
    plot_map_vs_ratio(rows, table, out / "map_vs_grad_ratio.png")
    done = rows[rows["status"] == "done"]
    runs = {
        name: [seed_dir(out, int(s)) / "runs" / name for s in done[done["variant"] == name]["seed"]]
        for name in variants
    }
    summary.plot_gradient_profiles(runs, out / "grad_profiles.png")
    return table
