"""Replay finished runs' recorded gradients through today's diagnosis, beside the findings they got live.

A grid's ``findings`` column is counted by the diagnosis of the commit that trained it. This re-reads each
run's history (``<run>/gradlight``: per-block ``grad_l2`` and the ``early_late_ratio``, with the block sizes of
``run.json``), feeds it step by step to :class:`gradlight.GradientDiagnosis` with the default thresholds, and
prints one row per run: the early/late ratio at the start and at the end, how far it fell, the ``vanishing``
warnings the run's own ``findings.jsonl`` holds and those the replay gives. The replay sees only what the
history stores (no activation taps, no backward-signal gains, no residual gains), so a level finding that
needed those can differ; the trend rule reads the early/late ratio alone and replays exactly::

    python -m casestudies.detection.rediagnose /work/runs/sweep_default      # every run below the folder

Example:
    >>> summarize_ratio(pd.Series([0.1, 0.1, 0.1, 0.1, 1e-3, 1e-4, 1e-4, 1e-4]))["fall_decades"]
    3.0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["find_runs", "live_findings", "main", "replay", "run_row", "summarize_ratio"]

#: Columns of the printed table, in order.
COLUMNS = ("run", "lr0", "start", "end", "fall_decades", "live", "replayed")


def find_runs(root: Path) -> list[Path]:
    """Every finished run below ``root`` (``gradlight/run.json`` beside ``result.json``), sorted by path."""
    runs = (path.parent.parent for path in Path(root).rglob("gradlight/run.json"))
    return sorted(run for run in runs if (run / "result.json").exists())


def replay(run_dir: Path, kind: str | None = "vanishing") -> list[Any]:
    """The warnings today's default diagnosis gives the recorded history of ``run_dir`` (of ``kind``, or all).

    Raises:
        FileNotFoundError: If ``run_dir`` holds no ``gradlight/run.json`` or history.
    """
    from gradlight import GradientDiagnosis, ModelProfile, StepRecord, load_history

    folder = Path(run_dir) / "gradlight"
    meta = json.loads((folder / "run.json").read_text())
    sizes = {layer["name"]: int(layer["num_params"]) for layer in meta["layers"]}
    frame = load_history(folder, metrics=["grad_l2", "early_late_ratio"])
    grad = frame[frame["metric"] == "grad_l2"]
    order = grad.drop_duplicates("layer").sort_values("depth")
    table = grad.pivot_table(index="step", columns="layer", values="value", aggfunc="last")[order["layer"]]
    ratio = frame[frame["metric"] == "early_late_ratio"].drop_duplicates("step", keep="last").set_index("step")
    diagnosis = GradientDiagnosis(profile=ModelProfile(layer_sizes=sizes))
    found: list[Any] = []
    for step, values in table.iterrows():
        keep = values.notna().to_numpy()
        layers = [str(name) for name, k in zip(order["layer"], keep, strict=True) if k]
        depths = order["depth"].to_numpy()[keep]
        globals_ = {"early_late_ratio": float(ratio["value"].get(step, np.nan))}
        record = StepRecord(int(step), layers, depths, {"grad_l2": values.to_numpy()[keep]}, globals_)
        found += diagnosis.update(record)
    return [f for f in found if f.is_warning and (kind is None or f.kind == kind)]


def live_findings(run_dir: Path, kind: str | None = "vanishing") -> list[dict[str, Any]]:
    """The warnings of ``kind`` (or all) in the run's own ``findings.jsonl``, written while it trained."""
    path = Path(run_dir) / "gradlight" / "findings.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("severity", "warning") == "warning" and (kind is None or r["kind"] == kind)]


def summarize_ratio(ratio: pd.Series) -> dict[str, float]:
    """The early/late ratio's level at the start (median of the first 5 logged steps), at the end (median of
    the last quarter, as ``summary.csv``'s column) and the fall between them in decades (positive: fell)."""
    values = ratio.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) == 0:
        return {"start": math.nan, "end": math.nan, "fall_decades": math.nan}
    start = float(np.median(values[:5]))
    end = float(np.median(values[-max(1, len(values) // 4) :]))
    return {"start": start, "end": end, "fall_decades": round(math.log10(start / end), 2)}


def run_row(run_dir: Path, root: Path) -> dict[str, Any]:
    """One row of the table: ``run``, ``lr0``, the ratio's summary, and the live and replayed warnings."""
    from gradlight import load_history

    frame = load_history(Path(run_dir) / "gradlight", metrics=["early_late_ratio"])
    spec = Path(run_dir) / "spec.json"
    lr0 = json.loads(spec.read_text()).get("training", {}).get("lr0", math.nan) if spec.exists() else math.nan
    row: dict[str, Any] = {"run": (Path(root).name / Path(run_dir).relative_to(root)).as_posix(), "lr0": lr0}
    row.update(summarize_ratio(frame.drop_duplicates("step", keep="last")["value"]))
    row["live"] = _describe([(f["layer"], f["step"], f["reported_step"]) for f in live_findings(run_dir)])
    row["replayed"] = _describe([(f.layer, f.step, f.reported_step) for f in replay(run_dir)])
    return row


def _describe(warnings: list[tuple[str, int, int]]) -> str:
    """``block 0 (from 0, at 60)``; ``-`` for none."""
    named = [f"block {layer.rsplit('.', 1)[-1]} (from {step}, at {reported})" for layer, step, reported in warnings]
    return "; ".join(named) or "-"


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.detection.rediagnose ROOT...``: the table of every run below each root."""
    parser = argparse.ArgumentParser(
        prog="python -m casestudies.detection.rediagnose", description=__doc__.split("\n")[0]
    )
    parser.add_argument("roots", nargs="+", type=Path, help="grid or sweep folders (every run below is read)")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    rows = []
    for root in args.roots:
        runs = find_runs(root)
        if not runs:
            print(f"rediagnose: error: no finished run (gradlight/run.json, result.json) below {root}", file=sys.stderr)
            return 2
        rows += [run_row(run, root) for run in runs]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if args.csv is not None:
        table.to_csv(args.csv, index=False)
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(table.to_string(index=False, na_rep="recipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
