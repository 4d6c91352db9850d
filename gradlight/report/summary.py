"""What a report computes: which runs to read, what they hold, and the numbers that summarize them.

Nothing here draws or writes a page. :func:`load_run` turns a path into a :class:`Run` (history, ``run.json``,
findings, and what could not be read); :func:`layer_grid` and friends reshape the long history into the
arrays the figures plot; :func:`summarize` gives the per-run numbers of the comparison table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from gradlight import runfolder
from gradlight.history import ProgressCallback, read_history
from gradlight.locate import AmbiguousRunFolderError, find_run_folder
from gradlight.records import GLOBAL_LAYER
from gradlight.runfolder import FINDINGS_FILE, HISTORY_SUBDIR, RUN_INFO_FILE, list_segments

__all__ = [
    "SLOPE_UNIT",
    "LayerGrid",
    "ReportInputError",
    "Run",
    "RunSpec",
    "RunSummary",
    "activation_sites",
    "early_late_series",
    "global_norm_series",
    "global_series",
    "history_bytes",
    "layer_grid",
    "load_run",
    "parse_run_spec",
    "profile_slope",
    "resolve_run_dir",
    "resolve_run_specs",
    "summarize",
]


#: A run as the caller names it: a path, a ``"label=path"`` string, or a ``(label, path)`` pair.
RunSpec = Union[str, "os.PathLike[str]", tuple[str, Union[str, "os.PathLike[str]"]]]


#: The unit of every profile slope (summary table, profile legend, docs): decades of ``grad_l2`` per layer.
SLOPE_UNIT = "decades/layer"


class ReportInputError(ValueError):
    """A run given to the report cannot be used (missing, no history, empty, bad label). One-line message."""


# ------------------------------------------------------------------------------------------- run inputs
def parse_run_spec(spec: RunSpec) -> tuple[str | None, Path]:
    """Split a run argument into ``(label, path)``; the label is ``None`` when none was given.

    A string that names an existing path is a path (even if it contains ``=``); otherwise ``label=path``
    splits at the one ``=``.

    Raises:
        ReportInputError: For more than one ``=``, or an empty label or path.

    Example:
        >>> parse_run_spec("baseline=runs/exp1/gradlight")
        ('baseline', PosixPath('runs/exp1/gradlight'))
        >>> parse_run_spec("runs/exp2")
        (None, PosixPath('runs/exp2'))
    """
    if isinstance(spec, tuple):
        label, path = spec
        label = str(label).strip()
        if not label:
            raise ReportInputError(f"empty label for run {str(path)!r}: write LABEL=PATH with a non-empty LABEL")
        return label, Path(path)
    text = os.fspath(spec)
    if "=" not in text or os.path.exists(text):
        return None, Path(text)
    parts = text.split("=")
    if len(parts) != 2:
        raise ReportInputError(f"cannot read the run argument {text!r}: expected PATH or LABEL=PATH with a single '='")
    label, path = parts[0].strip(), parts[1]
    if not label:
        raise ReportInputError(f"empty label in {text!r}: write LABEL=PATH with a non-empty LABEL")
    if not path:
        raise ReportInputError(f"empty path in {text!r}: write LABEL=PATH")
    return label, Path(path)


def resolve_run_dir(path: str | os.PathLike[str]) -> Path:
    """Find the monitor ``save_dir`` that ``path`` names (:func:`gradlight.locate.find_run_folder`).

    ``path`` may be the ``save_dir`` (holding ``history/``), the ``history`` folder itself, or a folder with
    exactly one run folder up to three levels below it: a Lightning ``log_dir`` or ``default_root_dir``,
    an Ultralytics ``runs`` folder.

    Raises:
        ReportInputError: If ``path`` does not exist, holds no history, or holds several (listed).

    Example:
        >>> resolve_run_dir("lightning_logs/version_0")  # doctest: +SKIP
        PosixPath('lightning_logs/version_0/gradlight')
    """
    try:
        return find_run_folder(path)
    except (FileNotFoundError, AmbiguousRunFolderError) as err:
        message = str(err).replace("; pass one of them:", "; pass one of them (or several as LABEL=PATH):")
        raise ReportInputError(message) from None


def resolve_run_specs(runs: Iterable[RunSpec] | Mapping[str, str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """Turn run arguments into unique ``(label, save_dir)`` pairs, in order.

    Unlabelled runs are named after their folder (the parent's name when the folder is the default
    ``gradlight``), or after their path if two folder names collide.

    Raises:
        ReportInputError: For a bad argument, a path without history, or two runs with the same label.
    """
    items: list[RunSpec] = list(runs.items()) if isinstance(runs, Mapping) else list(runs)
    if not items:
        raise ReportInputError("no run given: pass at least one monitor save_dir")
    parsed: list[tuple[str | None, Path, Path]] = []
    for item in items:
        label, path = parse_run_spec(item)
        parsed.append((label, path, resolve_run_dir(path)))
    explicit = [label for label, _, _ in parsed if label is not None]
    duplicates = sorted({label for label in explicit if explicit.count(label) > 1})
    if duplicates:
        raise ReportInputError(f"duplicate run label(s): {', '.join(repr(d) for d in duplicates)}")
    defaults = {id(entry): _default_label(entry[2]) for entry in parsed if entry[0] is None}
    counts: dict[str, int] = {}
    for label in [*explicit, *defaults.values()]:
        counts[label] = counts.get(label, 0) + 1
    resolved: list[tuple[str, Path]] = []
    for entry in parsed:
        label, path, save_dir = entry
        if label is None:
            label = defaults[id(entry)]
            if counts[label] > 1:
                label = str(path).rstrip("/\\") or str(save_dir)
        resolved.append((label, save_dir))
    final = [label for label, _ in resolved]
    duplicates = sorted({label for label in final if final.count(label) > 1})
    if duplicates:
        raise ReportInputError(
            f"two runs would both be labelled {duplicates[0]!r}; name them with LABEL=PATH (or pass a run once)"
        )
    return resolved


def _default_label(save_dir: Path) -> str:
    resolved = save_dir.resolve()
    if resolved.name == "gradlight" and resolved.parent.name:
        return resolved.parent.name
    return resolved.name or str(save_dir)


# ------------------------------------------------------------------------------------------- run contents
def _run_info_for_report(save_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
    """``run.json`` as a dict for the report, through :func:`gradlight.runfolder.read_run_info`.

    Returns ``(info, problem)``: ``info == {}`` when the file is missing or unreadable, ``problem`` says why
    (a newer format than this gradlight reads, a file that is not a JSON object, a torn write).

    Example:
        >>> _run_info_for_report("/nonexistent")
        ({}, None)
    """
    path = Path(save_dir) / RUN_INFO_FILE
    try:
        info = runfolder.read_run_info(save_dir)
    except runfolder.UnsupportedFormatError:  # a ValueError, but one the report must not hide
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        return {}, f"{path} could not be read ({err}); run settings are not shown"
    return ({} if info is None else info.to_dict()), None


@dataclass
class Run:
    """One monitored run as the report sees it.

    Attributes:
        label: The run's name in the report.
        save_dir: The monitor's ``save_dir``.
        frame: The history in long format (see :func:`gradlight.load_history`).
        info: ``run.json`` (``{}`` when missing).
        findings: The diagnosis findings, oldest first.
        warnings: What could not be read, in words (a torn history, a torn findings line, ...).
        truncated: Whether a history segment ended in a torn batch.
    """

    label: str
    save_dir: Path
    frame: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def clip_value(self) -> float | None:
        """The gradient clip value (``run.json``, else the history's ``clip_value``), or ``None``."""
        value = self.info.get("gradient_clip_val")
        if value is None:
            series = global_series(self.frame, "clip_value")
            finite = series[np.isfinite(series.to_numpy())]
            value = float(finite.iloc[-1]) if len(finite) else None
        try:
            number = float(value) if value is not None else None
        except (TypeError, ValueError):
            return None
        return number if number is not None and math.isfinite(number) and number > 0 else None

    @property
    def clip_algorithm(self) -> str:
        """``"norm"`` or ``"value"`` (Lightning's default is ``"norm"``)."""
        return str(self.info.get("gradient_clip_algorithm") or "norm")


def load_run(
    path: str | os.PathLike[str], label: str | None = None, *, progress: ProgressCallback | None = None
) -> Run:
    """Read one run for a report: history, ``run.json`` and findings.

    A torn history keeps the rows before the tear and says so in :attr:`Run.warnings`.

    Args:
        path: A monitor ``save_dir`` (or a folder with exactly one, see :func:`resolve_run_dir`).
        label: The run's name; defaults to its folder name.
        progress: Called with the number of history bytes read since its previous call, after every record
            batch and segment (see :func:`gradlight.history.read_history`); the calls sum to
            :func:`history_bytes`.

    Raises:
        ReportInputError: If there is no history, or nothing readable in it.

    Example:
        >>> run = load_run("runs/exp1/gradlight", label="baseline")  # doctest: +SKIP
        >>> run.frame.metric.unique()  # doctest: +SKIP
    """
    save_dir = resolve_run_dir(path)
    label = label or _default_label(save_dir)
    history_dir = save_dir / HISTORY_SUBDIR
    segments = list_segments(history_dir)
    if not segments:
        raise ReportInputError(f"the history in {str(history_dir)!r} is empty: no segment-*.arrow files")
    result = read_history(history_dir, progress)
    frame = result.frame
    torn = [segment for segment in result.segments if segment.truncated]
    if frame.empty:
        if torn:
            what = "; ".join(f"{segment.path.name}: {segment.rows} rows before the tear" for segment in torn)
            raise ReportInputError(f"the history in {str(history_dir)!r} is truncated and nothing is readable ({what})")
        raise ReportInputError(f"the history in {str(history_dir)!r} is empty: {len(segments)} segment(s), 0 rows")
    if not (frame["metric"] == "grad_l2").any():
        metrics = ", ".join(sorted(frame["metric"].unique()))
        raise ReportInputError(f"the history in {str(history_dir)!r} holds no per-layer grad_l2 rows (only: {metrics})")
    notes: list[str] = []
    if torn:
        steps = frame["step"]
        names = ", ".join(segment.path.name for segment in torn)
        notes.append(
            f"the history of {label!r} is truncated ({names} ends in a torn write); the report shows the "
            f"{len(frame)} readable rows, steps {int(steps.min())}-{int(steps.max())}"
        )
    info, problem = _run_info_for_report(save_dir)
    if problem:
        notes.append(problem)
    read = runfolder.read_findings(save_dir)
    findings, skipped = read.records(), len(read.skipped)
    if skipped:
        notes.append(
            f"{save_dir / FINDINGS_FILE}: skipped {skipped} unreadable line(s) (a torn write); "
            f"{len(findings)} finding(s) kept"
        )
    return Run(label, save_dir, frame, info, findings, notes, truncated=bool(torn))


def history_bytes(save_dir: str | os.PathLike[str]) -> int:
    """Total size of a run's history segment files: what :func:`load_run` reports progress against.

    Example:
        >>> history_bytes("/nonexistent")
        0
    """
    return sum(segment.stat().st_size for _, segment in list_segments(Path(save_dir) / HISTORY_SUBDIR))


# ---------------------------------------------------------------------------------------- reshaping
@dataclass
class LayerGrid:
    """One metric as a ``(layers, steps)`` array, layers in forward order.

    Attributes:
        values: ``values[i, j]`` is layer ``layers[i]`` at step ``steps[j]``; NaN where not recorded.
        present: Whether the history holds a row for ``(i, j)`` (tells "not recorded" from a NaN value).
        layers: Layer names, depth 0 first.
        depths: Each layer's depth.
        steps: The recorded optimizer steps, ascending.
    """

    values: np.ndarray
    present: np.ndarray
    layers: list[str]
    depths: np.ndarray
    steps: np.ndarray

    @property
    def empty(self) -> bool:
        """Whether the grid has no layer or no step."""
        return self.values.size == 0


def _layer_rows(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    rows = frame[frame["metric"].isin(list(metrics)) & (frame["layer"] != GLOBAL_LAYER)]
    return rows


def _ordered_layers(rows: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    if rows.empty:
        return [], np.zeros(0, dtype=np.int64)
    first = rows.groupby("layer", sort=False).agg(depth=("depth", "min"), step=("step", "min"))
    first["order"] = np.arange(len(first))
    first = first.sort_values(["depth", "order"], kind="stable")
    return [str(name) for name in first.index], first["depth"].to_numpy(dtype=np.int64)


def layer_grid(frame: pd.DataFrame, metric: str = "grad_l2", layers: Sequence[str] | None = None) -> LayerGrid:
    """Pivot one per-layer metric of a history to a ``(layers, steps)`` grid.

    Args:
        frame: A history in long format.
        metric: The per-layer metric.
        layers: The rows (default: every layer that has ``metric``, in forward order).

    Example:
        >>> from gradlight.history import COLUMNS
        >>> frame = pd.DataFrame([(0, "a", 0, "grad_l2", 1.0), (0, "b", 1, "grad_l2", 0.1)], columns=COLUMNS)
        >>> layer_grid(frame).values.tolist()
        [[1.0], [0.1]]
    """
    rows = _layer_rows(frame, [metric])
    rows = rows.drop_duplicates(["layer", "step"], keep="last")
    order, depths = _ordered_layers(rows)
    if layers is not None:
        depth_of = dict(zip(order, depths))
        order = list(layers)
        depths = np.asarray([depth_of.get(name, -1) for name in order], dtype=np.int64)
    steps = np.sort(rows["step"].unique()).astype(np.int64)
    values = np.full((len(order), len(steps)), np.nan)
    present = np.zeros((len(order), len(steps)), dtype=bool)
    if rows.empty or not order:
        return LayerGrid(values, present, order, depths, steps)
    # One scatter into the grid (a pandas pivot costs several times more on long histories).
    row_of = pd.Series(np.arange(len(order)), index=pd.Index(order))
    rows_index = row_of.reindex(rows["layer"].to_numpy()).to_numpy()
    keep = ~np.isnan(rows_index)
    r = rows_index[keep].astype(np.int64)
    c = np.searchsorted(steps, rows["step"].to_numpy()[keep])
    values[r, c] = rows["value"].to_numpy(dtype=np.float64)[keep]
    present[r, c] = True
    return LayerGrid(values, present, order, depths, steps)


def activation_sites(frame: pd.DataFrame) -> list[str]:
    """The activation sites recorded in a history (layers with ``act_*`` metrics), in forward order."""
    rows = frame[frame["metric"].str.startswith("act_") & (frame["layer"] != GLOBAL_LAYER)]
    return _ordered_layers(rows)[0]


def global_series(frame: pd.DataFrame, metric: str) -> pd.Series:
    """A run-wide metric as a float Series indexed by step (empty if not recorded)."""
    rows = frame[(frame["layer"] == GLOBAL_LAYER) & (frame["metric"] == metric)]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step")
    return pd.Series(rows["value"].to_numpy(dtype=np.float64), index=rows["step"].to_numpy(), name=metric)


def early_late_series(frame: pd.DataFrame, edge_layers: int = 1) -> pd.Series:
    """The early-to-late gradient ratio per step: recorded, else computed from per-layer ``grad_l2``.

    The ratio is the geometric mean of the first ``edge_layers`` layers' ``grad_l2`` over that of the last
    ones: far below 1 means the first layers barely learn (vanishing), far above 1 the opposite.
    """
    recorded = global_series(frame, "early_late_ratio")
    if len(recorded):
        return recorded
    grid = layer_grid(frame)
    if grid.empty:
        return pd.Series(dtype=np.float64, name="early_late_ratio")
    count = max(1, min(edge_layers, len(grid.layers) // 2 or 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(grid.values)
        ratio = np.exp(logs[:count].mean(axis=0) - logs[-count:].mean(axis=0))
    return pd.Series(ratio, index=grid.steps, name="early_late_ratio")


def global_norm_series(frame: pd.DataFrame) -> pd.Series:
    """The global gradient norm per step: recorded, else the root sum of squares of the layers' norms."""
    recorded = global_series(frame, "global_grad_l2")
    if len(recorded):
        return recorded
    grid = layer_grid(frame)
    values = np.sqrt(np.nansum(grid.values**2, axis=0)) if not grid.empty else np.zeros(0)
    return pd.Series(values, index=grid.steps, name="global_grad_l2")


def profile_slope(depths: np.ndarray, grad_l2: np.ndarray) -> float:
    """Least-squares slope of ``log10(grad_l2)`` against depth, in :data:`SLOPE_UNIT` (NaN if < 2 points).

    Positive: the first layers get the smallest gradients (the vanishing pattern, +1 is a 10x loss per
    layer); negative: gradients grow toward the input (the exploding pattern); near 0: a flat, healthy flow.

    Example:
        >>> round(profile_slope(np.arange(4), np.array([1e-3, 1e-2, 1e-1, 1.0])), 6)
        1.0
    """
    depths = np.asarray(depths, dtype=np.float64)
    values = np.asarray(grad_l2, dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 2 or np.ptp(depths[keep]) == 0:
        return float("nan")
    slope, _ = np.polyfit(depths[keep], np.log10(values[keep]), 1)
    return float(slope)


# ------------------------------------------------------------------------------------------- summary
@dataclass
class RunSummary:
    """The numbers that sum up one run in the comparison table.

    Attributes:
        label: The run's name.
        steps_recorded: How many optimizer steps the history holds.
        first_step: The first recorded step.
        last_step: The last recorded step.
        num_layers: Layers with a gradient norm.
        final_early_late_ratio: Early-to-late ratio at the last step with a finite one.
        min_grad_l2: The smallest layer ``grad_l2`` at the last step.
        min_grad_l2_layer: The layer it belongs to.
        max_grad_l2: The largest layer ``grad_l2`` at the last step.
        profile_slope: Decades of ``grad_l2`` per layer at the last step (see :func:`profile_slope`).
        final_global_grad_l2: The global gradient norm at the last step.
        final_loss: The loss at the last step it was recorded (NaN if never).
        findings: Number of findings.
        findings_by_kind: Findings per kind.
        truncated: Whether the history was torn.
    """

    label: str
    steps_recorded: int
    first_step: int
    last_step: int
    num_layers: int
    final_early_late_ratio: float
    min_grad_l2: float
    min_grad_l2_layer: str
    max_grad_l2: float
    profile_slope: float
    final_global_grad_l2: float
    final_loss: float
    findings: int
    findings_by_kind: dict[str, int]
    truncated: bool

    def as_row(self) -> dict[str, Any]:
        """The summary as one table row (column name -> value)."""
        return {
            "run": self.label,
            "steps": f"{self.first_step}-{self.last_step} ({self.steps_recorded} recorded)",
            "layers": self.num_layers,
            "final early/late ratio": self.final_early_late_ratio,
            "smallest layer gradient norm": self.min_grad_l2,
            "smallest at layer": self.min_grad_l2_layer,
            f"profile slope ({SLOPE_UNIT})": self.profile_slope,
            "final global gradient norm": self.final_global_grad_l2,
            "final loss": self.final_loss,
            "findings": self.findings,
        }


def _last_finite(series: pd.Series) -> float:
    values = series.to_numpy(dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


def summarize(run: Run) -> RunSummary:
    """Compute the per-run summary numbers.

    Example:
        >>> summary = summarize(load_run("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> summary.final_early_late_ratio, summary.min_grad_l2_layer  # doctest: +SKIP
        (1.2e-05, 'net.0')
    """
    grid = layer_grid(run.frame)
    steps = grid.steps
    last = grid.values[:, -1] if not grid.empty else np.zeros(0)
    finite = np.isfinite(last)
    if finite.any():
        index = int(np.argmin(np.where(finite, last, np.inf)))
        min_value, min_layer = float(last[index]), grid.layers[index]
        max_value = float(np.max(last[finite]))
    else:
        min_value, min_layer, max_value = float("nan"), "", float("nan")
    by_kind: dict[str, int] = {}
    for finding in run.findings:
        by_kind[finding["kind"]] = by_kind.get(finding["kind"], 0) + 1
    return RunSummary(
        label=run.label,
        steps_recorded=len(steps),
        first_step=int(steps[0]) if len(steps) else -1,
        last_step=int(steps[-1]) if len(steps) else -1,
        num_layers=len(grid.layers),
        final_early_late_ratio=_last_finite(early_late_series(run.frame)),
        min_grad_l2=min_value,
        min_grad_l2_layer=min_layer,
        max_grad_l2=max_value,
        profile_slope=profile_slope(grid.depths, last) if last.size else float("nan"),
        final_global_grad_l2=_last_finite(global_norm_series(run.frame)),
        final_loss=_last_finite(global_series(run.frame, "loss")),
        findings=len(run.findings),
        findings_by_kind=by_kind,
        truncated=run.truncated,
    )
