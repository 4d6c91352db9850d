"""Shared plumbing: a monitored Lightning fit, its diagnosis findings and report, tables, claim rows."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from torch.utils.data import DataLoader

import gradlight
from gradlight import GradientFlowMonitor, load_history

#: The only verdict classes of the summary (the issue's "holds / holds only when ... / does not hold").
HOLDS, HOLDS_ONLY_WHEN, DOES_NOT_HOLD = "holds", "holds only when", "does not hold"
VERDICT_CLASSES = (HOLDS, HOLDS_ONLY_WHEN, DOES_NOT_HOLD)


@dataclass
class Claim:
    """One row of the summary table.

    Attributes:
        experiment: Which experiment measured it (``classic``, ``decay``, ``recurrent``, ``exploding``).
        claim: The textbook statement.
        claimed: The value or behaviour the statement implies.
        measured: What this run measured (numbers come from the run, never typed in).
        verdict_class: One of :data:`VERDICT_CLASSES`, chosen by the code that judges the claim.
        verdict: The class followed by its free-text explanation (``holds only when <condition>``, ...);
            empty means the class alone.

    Raises:
        ValueError: If ``verdict_class`` is not one of the three, or ``verdict`` does not start with it.
    """

    experiment: str
    claim: str
    claimed: str
    measured: str
    verdict_class: str
    verdict: str = ""

    def __post_init__(self) -> None:
        self.verdict = self.verdict or self.verdict_class
        if self.verdict_class not in VERDICT_CLASSES:
            raise ValueError(f"verdict_class must be one of {VERDICT_CLASSES}, got {self.verdict_class!r}")
        if verdict_class_of(self.verdict) != self.verdict_class:
            raise ValueError(f"verdict {self.verdict!r} does not start with its class {self.verdict_class!r}")


def verdict_class_of(verdict: str) -> str | None:
    """The class a verdict text starts with (the longest matching one), ``None`` if none.

    ``holds`` and ``does not hold`` must be followed by nothing, ``:``, ``;`` or `` (`` (an explanation),
    ``holds only when`` by a space (the condition), so "holds only partly" or "holds for ..." match no class.
    """
    if verdict.startswith(HOLDS_ONLY_WHEN + " "):
        return HOLDS_ONLY_WHEN
    for name in (DOES_NOT_HOLD, HOLDS):
        rest = verdict[len(name) :]
        if verdict.startswith(name) and (rest == "" or rest[0] in ":;" or rest.startswith(" (")):
            return name
    return None


#: matplotlib's ``tab10`` colours, the study's palette.
TAB10: tuple[tuple[float, ...], ...] = tuple(tuple(rgb) for rgb in colormaps["tab10"](range(10))[:, :3].tolist())


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes like ``pyplot.subplots``, without pyplot (no backend chosen, no global state).

    Example:
        >>> fig, axes = subplots(1, 2, figsize=(6, 3))
        >>> len(axes)
        2
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed torch (and Lightning's helpers) without the banner."""
    L.seed_everything(seed, verbose=False)


def make_monitor(save_dir: Path, log_every_n_steps: int) -> GradientFlowMonitor:
    """The study's monitor: every ``log_every_n_steps`` steps, per layer, with activations and the diagnosis.

    Findings are only recorded (``findings.jsonl``; the study reads them), never raised or warned about;
    activation statistics feed the ``saturated`` / ``dead_units`` findings.
    """
    return GradientFlowMonitor(
        log_every_n_steps=log_every_n_steps,
        save_dir=save_dir,
        overwrite=True,
        on_anomaly="ignore",
        track_activations=True,
    )


def fit(
    module: L.LightningModule,
    train: DataLoader,
    val: DataLoader | None,
    save_dir: Path,
    epochs: int,
    log_every_n_steps: int = 1,
    gradient_clip_val: float | None = None,
    callbacks: list[L.Callback] | None = None,
) -> pd.DataFrame:
    """Train ``module`` on CPU under a :class:`GradientFlowMonitor`; return the run's history.

    Lightning's own logging, checkpoints and progress bars are off: the history, the module's own
    per-epoch table and the extra ``callbacks`` are the only outputs.
    """
    monitor = make_monitor(save_dir, log_every_n_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val,
        callbacks=[monitor, *(callbacks or [])],
        default_root_dir=str(save_dir),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="gradlight")
        trainer.fit(module, train, val)
    return load_history(save_dir)


def load_findings_of(save_dir: Path) -> pd.DataFrame:
    """The run's diagnosis findings (an empty frame with the findings' columns when there were none)."""
    return gradlight.load_findings(save_dir)


def build_report(runs: list[str], out_dir: Path) -> Path:
    """``gradlight.report.build_report`` over ``runs`` (``label=path`` strings), without a progress bar."""
    from gradlight.report import build_report as gradlight_build_report

    return gradlight_build_report(runs, out_dir, progress=False)


def global_series(history: pd.DataFrame, metric: str) -> pd.Series:
    """One run-wide metric (``layer == "__global__"``) indexed by step."""
    rows = history[(history.layer == gradlight.GLOBAL_LAYER) & (history.metric == metric)]
    return rows.set_index("step")["value"].sort_index()


def layer_table(history: pd.DataFrame, metric: str = "grad_l2", weights_only: bool = False) -> pd.DataFrame:
    """``step x layer`` table of one per-layer metric, columns in depth order.

    Args:
        history: A :func:`gradlight.load_history` frame.
        metric: The per-layer metric.
        weights_only: Keep only the Linear/Conv layers (``*.layer`` and ``*head``), not BatchNorm.
    """
    rows = history[(history.layer != gradlight.GLOBAL_LAYER) & (history.metric == metric)]
    if weights_only:
        rows = rows[rows.layer.str.endswith(".layer") | rows.layer.str.endswith("head")]
    order = rows.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    return rows.pivot(index="step", columns="layer", values="value")[order]


def fit_decay(depths: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``log10(values)`` against depth, in decades per layer, and its R^2.

    Non-positive or non-finite values are left out; fewer than two points give ``nan``.
    """
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 2:
        return float("nan"), float("nan")
    x = np.asarray(depths, dtype=np.float64)[keep]
    y = np.log10(values[keep])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 1.0
    return float(slope), r2


def fmt(value: float, digits: int = 2) -> str:
    """Compact number: ``3.1e-06``, ``0.25``, ``nan``."""
    if value is None or not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"


def write_table(frame: pd.DataFrame, path_stem: Path, float_digits: int = 3) -> None:
    """Write ``frame`` as ``<stem>.csv`` (full precision) and ``<stem>.md`` (rounded, GitHub table)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path_stem.with_suffix(".csv"), index=False)
    path_stem.with_suffix(".md").write_text(to_markdown(frame, float_digits) + "\n")


def to_markdown(frame: pd.DataFrame, float_digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no ``tabulate`` dependency)."""

    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return fmt(float(value), float_digits)
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    """Claims as a DataFrame with the summary's columns."""
    return pd.DataFrame([asdict(c) for c in claims])


def save_json(path: Path, payload: Any) -> None:
    """Write JSON (NaN allowed) creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def threads_hint() -> int:
    """Torch's intra-op thread count (reported next to timings)."""
    return torch.get_num_threads()
