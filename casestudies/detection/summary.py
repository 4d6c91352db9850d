"""Turn the grid's run folders into ``summary.csv``/``.json``, plots, and a printed table.

Each run folder holds ``result.json`` (written when the run finished), ``gradlight/`` (the gradient-flow
history), ``loss.csv`` (per-step training loss, ``box + cls + dfl`` as Ultralytics prints it) and, if a
diagnosis ran, ``gradlight/findings.jsonl``. Everything here is recomputed from those files, so a summary can
always be rebuilt from the runs.

Gradient columns, over the last quarter of logged steps (the end of training, warm-up excluded):

* ``grad_ratio_early_late``: median of the ``early_late_ratio`` global metric (first layer's gradient L2 norm
  over the last layer's; 1e-3 means the first layer gets a thousandth of the last one's gradient);
* ``min_layer_grad_l2`` / ``min_layer``: the smallest per-layer median ``grad_l2`` and the layer it belongs to.

Example:
    >>> row = summarize_run(Path("runs/grid/runs/intact"), {"variant": "intact"})  # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlight import __version__
from gradlight.history import load_history
from gradlight.records import GLOBAL_LAYER
from gradlight.report import ExtraSection, build_report
from gradlight.report.html import ImageBlock, render_page
from gradlight.runfolder import RunFolder, read_findings

#: Columns of ``summary.csv``, in this order (more may follow).
COLUMNS = (
    "variant",
    "model",
    "trainer",
    "residual",
    "batchnorm",
    "activation",
    "params",
    "epochs",
    "images_per_s",
    "final_train_loss",
    "map50_95",
    "map50",
    "grad_ratio_early_late",
    "min_layer_grad_l2",
    "min_layer",
    "first_layer_grad_l2",
    "findings",
    "warnings",
)
EXTRA_COLUMNS = ("train_seconds", "optimizer_steps", "ultralytics_map50_95", "status", "run_dir")
#: Variant name of the Ultralytics baseline run (drawn in black in every plot).
BASELINE_NAME = "ultralytics"
#: Fraction of the logged steps, counted from the end, that the gradient columns summarise.
TAIL_FRACTION = 0.25


def tail_steps(steps: Sequence[int] | np.ndarray, fraction: float = TAIL_FRACTION) -> np.ndarray:
    """The last ``fraction`` of the distinct logged ``steps`` (at least one).

    Example:
        >>> tail_steps([0, 2, 4, 6, 8, 10, 12, 14]).tolist()
        [12, 14]
    """
    unique = np.unique(np.asarray(steps))
    if unique.size == 0:
        return unique
    return unique[-max(1, math.ceil(unique.size * fraction)) :]


def gradient_columns(history: pd.DataFrame) -> dict[str, Any]:
    """``grad_ratio_early_late``, ``min_layer_grad_l2`` and ``min_layer`` of one run's history."""
    nan = float("nan")
    empty = {"grad_ratio_early_late": nan, "min_layer_grad_l2": nan, "min_layer": "", "first_layer_grad_l2": nan}
    if history.empty:
        return empty
    tail = history[history["step"].isin(tail_steps(history["step"].to_numpy()))]
    ratio = tail[(tail["layer"] == GLOBAL_LAYER) & (tail["metric"] == "early_late_ratio")]["value"]
    layers = layer_medians(tail)
    if layers.empty:
        return {**empty, "grad_ratio_early_late": _median(ratio)}
    return {
        "grad_ratio_early_late": _median(ratio),
        "min_layer_grad_l2": float(layers.min()),
        "min_layer": str(layers.idxmin()),
        "first_layer_grad_l2": float(layers.iloc[0]),
    }


def layer_medians(history: pd.DataFrame, metric: str = "grad_l2") -> pd.Series:
    """Median of ``metric`` per layer, in depth order (index: layer name)."""
    rows = history[(history["layer"] != GLOBAL_LAYER) & (history["metric"] == metric)]
    if rows.empty:
        return pd.Series(dtype=float)
    grouped = rows.groupby("layer", sort=False).agg(depth=("depth", "min"), value=("value", "median"))
    return grouped.sort_values("depth")["value"]


def _median(values: pd.Series) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.median()) if len(finite) else float("nan")


def read_losses(run_dir: Path) -> pd.DataFrame:
    """Per-step training loss of a run (``step, epoch, loss``); a resumed run's recomputed steps win."""
    path = Path(run_dir) / "loss.csv"
    if not path.exists():
        return pd.DataFrame({"step": [], "epoch": [], "loss": []})
    frame = pd.read_csv(path)
    return frame.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)


def final_train_loss(losses: pd.DataFrame) -> float:
    """Mean per-step training loss over the last epoch."""
    if losses.empty:
        return float("nan")
    return float(losses[losses["epoch"] == losses["epoch"].max()]["loss"].mean())


def count_findings(run_dir: Path) -> tuple[int, int]:
    """``(findings, warnings)``: the run's findings (warnings and notes) and those of severity ``"warning"``.

    Read by :func:`gradlight.runfolder.read_findings`; ``(0, 0)`` when there are none.
    """
    for folder in (Path(run_dir) / "gradlight", Path(run_dir)):
        if RunFolder(folder).findings_file.exists():
            frame = read_findings(folder).frame
            return len(frame), int((frame["severity"] == "warning").sum())
    return 0, 0


def summarize_run(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """One summary row: ``info`` (variant, model, switches) + ``result.json`` + what the files say."""
    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    row: dict[str, Any] = {name: float("nan") for name in COLUMNS}
    row.update(info)
    row.update({key: result[key] for key in result if key in COLUMNS or key in EXTRA_COLUMNS})
    row["status"] = "done" if result else info.get("status", "missing")
    row["run_dir"] = str(run_dir)
    try:
        history = load_history(run_dir / "gradlight")
    except FileNotFoundError:
        history = pd.DataFrame(columns=["step", "layer", "depth", "metric", "value"])
    row.update(gradient_columns(history))
    row["final_train_loss"] = final_train_loss(read_losses(run_dir))
    row["findings"], row["warnings"] = count_findings(run_dir)
    return row


def write_summary(rows: list[dict[str, Any]], out_dir: Path) -> pd.DataFrame:
    """Write ``summary.csv`` and ``summary.json`` (one row per variant) and return the frame."""
    frame = pd.DataFrame(rows)
    ordered = [c for c in (*COLUMNS, *EXTRA_COLUMNS) if c in frame.columns]
    frame = frame[ordered + [c for c in frame.columns if c not in ordered]]
    frame.to_csv(out_dir / "summary.csv", index=False)
    records = json.loads(frame.to_json(orient="records"))
    (out_dir / "summary.json").write_text(json.dumps(records, indent=2))
    return frame


def format_table(frame: pd.DataFrame) -> str:
    """The summary as a fixed-width text table for the terminal."""
    shown = {
        "variant": "variant",
        "trainer": "trainer",
        "map50_95": "mAP50-95",
        "map50": "mAP50",
        "grad_ratio_early_late": "early/late",
        "min_layer_grad_l2": "min grad",
        "min_layer": "min layer",
        "final_train_loss": "loss",
        "images_per_s": "img/s",
        "status": "status",
    }
    table = frame[[c for c in shown if c in frame.columns]].rename(columns=shown)
    formatters = {
        "mAP50-95": "{:.3f}".format,
        "mAP50": "{:.3f}".format,
        "early/late": "{:.2e}".format,
        "min grad": "{:.2e}".format,
        "loss": "{:.3f}".format,
        "img/s": "{:.1f}".format,
    }
    return table.to_string(index=False, formatters=formatters, na_rep="-")


# ---------------------------------------------------------------------------------------------------- plots
def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A figure and its axes, drawn without pyplot (no backend is chosen, no global state changes).

    Example:
        >>> fig, ax = new_figure(4, 3)
        >>> type(fig).__name__
        'Figure'
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_map_vs_ratio(frame: pd.DataFrame, path: Path) -> Path:
    """mAP50-95 against the early/late gradient ratio, one labelled point per variant, log x."""
    fig, ax = new_figure(7, 4.5)
    for _, row in frame.iterrows():
        x, y = row["grad_ratio_early_late"], row["map50_95"]
        if not (np.isfinite(x) and np.isfinite(y) and x > 0):
            continue
        baseline = row["trainer"] == "ultralytics"
        style = {"marker": "*", "color": "black", "s": 110} if baseline else {"marker": "o", "s": 60}
        ax.scatter(x, y, label=str(row["variant"]), zorder=3, **style)  # a legend: close points never collide
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("early/late gradient ratio (median, last quarter of training; log)")
    ax.set_ylabel("mAP50-95 (pycocotools)")
    ax.set_title("Gradient reaching the first layer vs. detection quality")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_loss_curves(runs: dict[str, Path], path: Path, steps_per_epoch: float | None = None) -> Path:
    """Training loss per optimizer step of every run, overlaid (a light moving average, log y)."""
    fig, ax = new_figure(7, 4.5)
    for name, run_dir in runs.items():
        losses = read_losses(run_dir)
        if losses.empty:
            continue
        window = max(1, len(losses) // 40)
        smooth = losses["loss"].rolling(window, min_periods=1).mean()
        style = {"color": "black", "linestyle": "--"} if name == BASELINE_NAME else {}
        ax.plot(losses["step"], smooth, label=name, linewidth=1.4, **style)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (box + cls + dfl)")
    ax.set_title("Training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def tail_layer_medians(run_dir: Path, metric: str = "grad_l2") -> pd.Series:
    """Per-layer median of ``metric`` over the last quarter of a run's logged steps (empty: no history)."""
    try:
        history = load_history(Path(run_dir) / "gradlight", metrics=[metric])
    except FileNotFoundError:
        return pd.Series(dtype=float)
    tail = history[history["step"].isin(tail_steps(history["step"].to_numpy()))]
    return layer_medians(tail, metric)


def profile_band(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Per-block median ``grad_l2`` (last quarter) of each run, combined: geometric mean, min, max, count.

    Index: layer name in depth order; columns ``mean`` (geometric mean over runs), ``min``, ``max``, ``n``.
    Runs without a history are skipped.
    """
    columns = [medians for medians in (tail_layer_medians(Path(r)) for r in run_dirs) if not medians.empty]
    if not columns:
        return pd.DataFrame(columns=["mean", "min", "max", "n"])
    stacked = pd.concat(columns, axis=1)
    positive = stacked.where(stacked > 0)
    return pd.DataFrame(
        {
            "mean": 10 ** np.log10(positive).mean(axis=1),
            "min": stacked.min(axis=1),
            "max": stacked.max(axis=1),
            "n": stacked.notna().sum(axis=1),
        }
    )


def plot_gradient_profiles(runs: Mapping[str, Path | Sequence[Path]], path: Path) -> Path:
    """Per-block median gradient L2 norm (last quarter of training) against depth, one line per run.

    A name with several runs (one per seed) is drawn as their geometric mean with a band from the smallest
    to the largest run.
    """
    fig, ax = new_figure(8, 4.5)
    labels: list[str] = []
    several = False
    for index, (name, run_dirs) in enumerate(runs.items()):
        band = profile_band([run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs))
        if band.empty:
            continue
        baseline = name == BASELINE_NAME
        color = "black" if baseline else f"C{index % 10}"
        x = np.arange(len(band))
        ax.plot(x, band["mean"], marker=".", color=color, linestyle="--" if baseline else "-", label=name)
        if int(band["n"].max()) > 1:
            several = True
            ax.fill_between(x, band["min"], band["max"], color=color, alpha=0.15, linewidth=0)
        if len(band) > len(labels):
            labels = [layer.rsplit(".", 1)[-1] for layer in band.index]
    if labels:
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("YOLO block (forward order)")
    ax.set_ylabel("gradient L2 norm (median, last quarter)")
    title = "Where the gradient goes: per-block gradient norm"
    ax.set_title(title + ("\n(geometric mean over seeds, band: min to max)" if several else ""))  # fits the width
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------------- report
def grid_section(frame: pd.DataFrame, figures: Sequence[Path]) -> ExtraSection:
    """The grid's own results for gradlight's report: the summary table and the comparison plots."""
    table = frame.drop(columns=["run_dir"], errors="ignore").to_html(
        index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, classes="grid-summary"
    )
    style = (
        "<style>.grid-summary{border-collapse:collapse;font-size:13px}"
        ".grid-summary td,.grid-summary th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style>"
    )
    images = [ImageBlock(path.stem, "", path.read_bytes(), path.name) for path in map(Path, figures) if path.exists()]
    body = (
        f"{style}{table}<p>grad_ratio_early_late and min_layer_grad_l2: medians over the last quarter of logged "
        "steps; mAP by pycocotools on the final EMA weights.</p>"
    )
    return ExtraSection("Ablation grid: summary", body, images)


def write_report(
    frame: pd.DataFrame, runs: dict[str, Path], figures: Sequence[Path], out_dir: Path, title: str
) -> Path:
    """``out_dir/report.html``: the grid summary on top of ``gradlight report`` over every run's history.

    The gradlight report (and its PNGs) is built in ``out_dir/report/`` with the grid summary as its first
    section; if it cannot be built (no history yet) the page holds the grid summary alone, with the reason.
    """
    section = grid_section(frame, figures)
    histories = {name: Path(run) / "gradlight" for name, run in runs.items() if (Path(run) / "gradlight").exists()}
    path = out_dir / "report.html"
    try:
        built = build_report(histories, out_dir / "report", title=title, progress=False, extra_sections=[section])
        page = built.read_text(encoding="utf-8")
    except Exception as error:  # the grid's results must survive a report failure
        reason = ExtraSection(
            "gradlight report could not be built", f"<p>{html.escape(f'{type(error).__name__}: {error}')}</p>"
        )
        page = render_page(title, [], extra_sections=[section, reason], version=__version__)
    path.write_text(page, encoding="utf-8")
    return path


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """The summary as a Markdown table (numbers rounded for reading), for docs.

    Example:
        >>> print(markdown_table(pd.DataFrame({"variant": ["intact"], "map50_95": [0.41234]})))
        | variant | map50_95 |
        |---|---|
        | intact | 0.412 |
    """
    columns = list(columns or frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return str(value)
    number = float(value)
    if not np.isfinite(number):
        return "-"
    return f"{number:.3g}" if abs(number) < 1e-2 or abs(number) >= 1e4 else f"{number:.3f}".rstrip("0").rstrip(".")
