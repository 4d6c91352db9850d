"""Learning-rate sweep of the grid: each variant at its own best ``lr0``, so no recipe confounds the architecture.

Stage 1 trains every variant at every learning rate with one seed (``OUT/lr-<lr0>/``, an ordinary grid with
``training: {lr0: ..., <warm-up rule>}``); the warm-up rule is the same for every variant (by default
Ultralytics' own: 3 epochs, bias warm-up from 0.1), so only ``lr0`` changes. Each variant's best ``lr0`` is the
one with the highest mAP50-95 (ties, e.g. 0.000 everywhere, go to the lower final training loss). Stage 2
trains each variant at its best ``lr0`` with every seed (``OUT/best-<variant>/seed-<s>/``) and aggregates them
(:mod:`casestudies.detection.seeds`); the seed stage 1 trained (the grid's ``seed``, 0 by default) is stage 1's
run at that ``lr0``, copied, not trained again. Files: ``OUT/sweep.csv`` (one row per variant and learning rate),
``OUT/best.csv`` (each variant's pick), ``OUT/best_aggregate.csv`` (stage 2) and ``OUT/map_vs_lr.png`` (mAP
against ``lr0``, one line per variant). Step-0 gradients (before any update, so independent of ``lr0``) are
reported beside the end-of-run medians: ``step0_early_late`` and ``step0_first_layer_grad_l2``::

    python -m casestudies.detection.sweep --preset smoke --lrs 0.001,0.003,0.01,0.02 --seeds 0,1,2 --out /tmp/sweep

Example:
    >>> rows = pd.DataFrame({"variant": ["a", "a"], "lr0": [0.01, 0.02], "map50_95": [0.1, 0.2],
    ...                      "final_train_loss": [5.0, 6.0]})
    >>> best_lrs(rows)["a"]
    0.02
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from casestudies.detection import summary
from casestudies.detection.grid.config import GridConfig, GridError

__all__ = [
    "WARMUP",
    "best_config",
    "best_lrs",
    "lr_config",
    "main",
    "plot_map_vs_lr",
    "reuse_stage_one",
    "step0_columns",
    "sweep_rows",
]

#: The warm-up rule every variant shares in the sweep (Ultralytics' defaults: the intact recipe's).
WARMUP: dict[str, float] = {"warmup_epochs": 3.0, "warmup_bias_lr": 0.1}
#: Exit code of a grid stopped by Ctrl-C or SIGTERM (:func:`~casestudies.detection.grid.runner.run_grid`).
INTERRUPTED = 130
#: Columns of ``sweep.csv``.
SWEEP_COLUMNS = (
    "variant",
    "lr0",
    "seed",
    "status",
    "map50_95",
    "map50",
    "final_train_loss",
    "grad_ratio_early_late",
    "first_layer_grad_l2",
    "step0_early_late",
    "step0_first_layer_grad_l2",
)


def lr_dir(out: Path, lr0: float) -> Path:
    """Stage 1's folder of one learning rate.

    Example:
        >>> lr_dir(Path("runs/sweep"), 0.003).as_posix()
        'runs/sweep/lr-0.003'
    """
    return Path(out) / f"lr-{lr0:g}"


def lr_config(config: GridConfig, lr0: float, out: Path, warmup: dict[str, float] | None = None) -> GridConfig:
    """The grid of ``config``'s variants at ``lr0`` with the shared warm-up rule, in ``out``."""
    if not lr0 > 0:
        raise GridError(f"lr0={lr0!r} is not valid; learning rates must be positive")
    training = {**config.training, **(WARMUP if warmup is None else warmup), "lr0": float(lr0)}
    return dataclasses.replace(config, training=training, out=str(out))


def step0_columns(run_dir: Path) -> dict[str, float]:
    """Early/late ratio and first-layer gradient at the first logged step (before any update)."""
    nan = float("nan")
    folder = Path(run_dir) / "gradlight"
    if not folder.exists():
        return {"step0_early_late": nan, "step0_first_layer_grad_l2": nan}
    from gradlight import load_history

    frame = load_history(folder)
    first = frame[frame["step"] == frame["step"].min()]
    ratio = first[first["metric"] == "early_late_ratio"]["value"]
    grads = first[(first["metric"] == "grad_l2") & (first["layer"] != "__global__")].sort_values("depth")["value"]
    return {
        "step0_early_late": float(ratio.iloc[0]) if len(ratio) else nan,
        "step0_first_layer_grad_l2": float(grads.iloc[0]) if len(grads) else nan,
    }


def sweep_rows(grid_rows: dict[float, pd.DataFrame], runs: dict[float, Path] | None = None) -> pd.DataFrame:
    """One row per variant and learning rate from each ``lr0``'s grid summary (``summary.csv`` rows).

    Args:
        grid_rows: ``lr0 -> that grid's summary rows``.
        runs: ``lr0 -> that grid's folder``, to add the step-0 columns from each run's history.

    Raises:
        ValueError: If a summary holds a variant twice (it must be one row per variant and learning rate).
    """
    frames = []
    for lr0, rows in sorted(grid_rows.items()):
        if rows["variant"].duplicated().any():
            raise ValueError(f"the grid at lr0={lr0:g} has a variant twice: {rows['variant'].tolist()}")
        frame = rows.copy()
        frame.insert(1, "lr0", float(lr0))
        if runs is not None:
            extra = [step0_columns(Path(runs[lr0]) / "runs" / str(v)) for v in frame["variant"]]
            for column in ("step0_early_late", "step0_first_layer_grad_l2"):
                frame[column] = [e[column] for e in extra]
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    ordered = [c for c in SWEEP_COLUMNS if c in table.columns]
    table = table[ordered + [c for c in table.columns if c not in ordered]]
    return table.sort_values(["variant", "lr0"], kind="stable").reset_index(drop=True)


def best_lrs(rows: pd.DataFrame) -> dict[str, float]:
    """Each variant's ``lr0`` with the highest mAP50-95 among finished runs; ties to the lower final loss.

    Example:
        >>> rows = pd.DataFrame({"variant": ["b"] * 3, "lr0": [0.001, 0.01, 0.02], "map50_95": [0.0, 0.0, 0.0],
        ...                      "final_train_loss": [9.0, 8.1, 8.4]})
        >>> best_lrs(rows)
        {'b': 0.01}
    """
    done = rows[rows["status"] == "done"] if "status" in rows.columns else rows
    done = done[np.isfinite(done["map50_95"].astype(float))]
    picks: dict[str, float] = {}
    for variant, group in done.groupby("variant", sort=False):
        loss = group["final_train_loss"].astype(float).fillna(np.inf)
        ranked = group.assign(_loss=loss).sort_values(["map50_95", "_loss"], ascending=[False, True], kind="stable")
        picks[str(variant)] = float(ranked["lr0"].iloc[0])
    return picks


def plot_map_vs_lr(rows: pd.DataFrame, best: dict[str, float], path: Path) -> Path:
    """mAP50-95 against ``lr0`` (log axis), one line per variant, each variant's pick circled."""
    fig, ax = summary.new_figure(6.5, 4.2)
    for index, (variant, group) in enumerate(rows.groupby("variant", sort=False)):
        group = group.sort_values("lr0")
        color = f"C{index % 10}"
        ax.plot(group["lr0"], group["map50_95"], marker="o", color=color, label=str(variant))
        pick = group[group["lr0"] == best.get(str(variant), np.nan)]
        ax.scatter(pick["lr0"], pick["map50_95"], s=140, facecolors="none", edgecolors=color, linewidths=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("lr0 (one seed; circled: the variant's best)")
    ax.set_ylabel("mAP50-95 (pycocotools)")
    ax.set_title("Learning-rate sweep: each variant's own best lr0")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_sweep(
    config: GridConfig,
    lrs: Sequence[float],
    seeds: Sequence[int],
    stage: str = "both",
    warmup: dict[str, float] | None = None,
) -> int:
    """Stage 1 (every variant at every ``lr0``), then stage 2 (best ``lr0``, every seed). Returns an exit code.

    ``warmup`` is the warm-up rule every variant shares (default :data:`WARMUP`, Ultralytics' own).
    """
    warmup = dict(WARMUP if warmup is None else warmup)
    from casestudies.detection.grid.runner import run_grid

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    grids = {float(lr): lr_config(config, lr, lr_dir(out, lr), warmup) for lr in lrs}
    if stage in ("both", "lrs"):
        for grid in grids.values():
            code = max(code, run_grid(grid))
            if code == INTERRUPTED:  # Ctrl-C / SIGTERM stops the sweep, not just this learning rate
                return code
    summaries = {lr: _summary_of(g) for lr, g in grids.items() if _has_summary(g)}
    if not summaries:
        print("sweep: no learning rate finished; nothing to pick", file=sys.stderr)
        return 1
    rows = sweep_rows(summaries, {lr: Path(grids[lr].out) for lr in summaries})
    rows.to_csv(out / "sweep.csv", index=False)
    best = best_lrs(rows)
    pd.DataFrame({"variant": list(best), "best_lr0": list(best.values())}).to_csv(out / "best.csv", index=False)
    plot_map_vs_lr(rows, best, out / "map_vs_lr.png")
    print(summary.markdown_table(rows[[c for c in SWEEP_COLUMNS if c in rows.columns]]))
    print("best lr0:", ", ".join(f"{v} {lr:g}" for v, lr in best.items()))
    if stage in ("both", "best") and seeds:
        code = max(code, _stage_two(config, best, seeds, out, warmup))
    return code


def best_config(
    config: GridConfig,
    variant: str,
    lr0: float,
    seeds: Sequence[int],
    out: Path,
    warmup: dict[str, float] | None = None,
) -> GridConfig:
    """Stage 2's grid of one variant: ``variant`` at ``lr0`` with every seed, in ``OUT/best-<variant>/``."""
    folder = Path(out) / f"best-{variant}"
    return dataclasses.replace(lr_config(config, lr0, folder, warmup), variants=[variant], seeds=list(seeds))


def reuse_stage_one(config: GridConfig, variant: str, lr0: float, seeds: Sequence[int], out: Path) -> Path | None:
    """Copy stage 1's finished run of ``variant`` at ``lr0`` to where stage 2 would train the same seed again.

    Stage 1 trains with ``config.seed``; stage 2's run of that seed at the same ``lr0`` would repeat it (same
    initial weights, data set, data order and recipe: a CPU run is deterministic), so the grid's ``--resume``
    keeps the copy instead. Returns the copy's folder, or None when there is nothing to reuse (the seed is not
    asked for, stage 1's run did not finish, or stage 2 already holds a run of that seed).

    Example:
        >>> reuse_stage_one(GridConfig(preset="smoke"), "intact", 0.01, seeds=[1, 2], out=Path("/nowhere")) is None
        True
    """
    from casestudies.detection.grid.config import seed_config
    from casestudies.detection.grid.runner import is_finished

    if config.seed not in seeds:
        return None
    source = lr_dir(Path(out), lr0) / "runs" / variant
    target = Path(seed_config(best_config(config, variant, lr0, seeds, out), config.seed).out) / "runs" / variant
    if not is_finished(source) or target.exists():
        return None
    shutil.copytree(source, target, symlinks=True)
    return target


def _stage_two(
    config: GridConfig, best: dict[str, float], seeds: Sequence[int], out: Path, warmup: dict[str, float]
) -> int:
    from casestudies.detection import seeds as seed_stats
    from casestudies.detection.grid.runner import run_grid

    code, tables = 0, []
    for variant, lr0 in best.items():
        grid = best_config(config, variant, lr0, seeds, out, warmup)
        folder = Path(grid.out)
        if (reused := reuse_stage_one(config, variant, lr0, seeds, out)) is not None:
            print(f"sweep: seed {config.seed} of {variant} at lr0 {lr0:g} is stage 1's run, copied to {reused}")
        code = max(code, run_grid(grid))
        if code == INTERRUPTED:
            return code
        table = seed_stats.aggregate(seed_stats.load_seed_rows(folder, seeds, [variant]), seeds)
        tables.append(table.assign(lr0=lr0))
    result = pd.concat(tables, ignore_index=True)
    result.to_csv(out / "best_aggregate.csv", index=False)
    print(seed_stats.format_aggregate(result))
    return code


def _summary_of(grid: GridConfig) -> pd.DataFrame:
    """The grid's ``summary.csv`` rows of its own variants (a folder may hold more, from an earlier sweep)."""
    rows = pd.read_csv(Path(grid.out) / "summary.csv")
    return rows[rows["variant"].isin(list(grid.variants))].reset_index(drop=True)


def _has_summary(grid: GridConfig) -> bool:
    return (Path(grid.out) / "summary.csv").exists()


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.detection.sweep``: see the module docstring. Returns the exit code."""
    from casestudies.detection.grid.cli import config_from_args
    from casestudies.detection.offline import configure_offline

    parser = argparse.ArgumentParser(prog="python -m casestudies.detection.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--variants", help="comma-separated variants (default: the preset's)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.02", help="comma-separated lr0 values")
    parser.add_argument("--seeds", default="0,1,2", help="stage 2 seeds; empty: stage 1 only")
    parser.add_argument("--stage", choices=("both", "lrs", "best"), default="both")
    parser.add_argument(
        "--warmup-bias-lr",
        type=float,
        default=WARMUP["warmup_bias_lr"],
        help="every bias's learning rate at the start of warm-up, lowered linearly to lr0 (Ultralytics: 0.1; "
        "0: the biases ramp from 0 like the weights)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    configure_offline()
    grid_args = ["--preset", args.preset, "--out", args.out, "--resume"]
    grid_args += ["--variants", args.variants] if args.variants else []
    grid_args += ["--epochs", str(args.epochs)] if args.epochs else []
    from casestudies.detection.grid.cli import build_parser

    try:
        config = config_from_args(build_parser().parse_args(grid_args))
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except (GridError, ValueError) as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    if len(lrs) < 1:
        print(f"sweep: error: --lrs {args.lrs!r} gives no learning rate", file=sys.stderr)
        return 2
    if not args.warmup_bias_lr >= 0:
        print(f"sweep: error: --warmup-bias-lr {args.warmup_bias_lr!r} is not valid; it must be >= 0", file=sys.stderr)
        return 2
    return run_sweep(config, lrs, seeds, args.stage, {**WARMUP, "warmup_bias_lr": args.warmup_bias_lr})


if __name__ == "__main__":
    sys.exit(main())
