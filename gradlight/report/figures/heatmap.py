"""Heat maps: one row per layer (or tapped block), one column per recorded step, colour in decades."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator

from gradlight.report.figures._common import (
    MISSING_COLOR,
    NONFINITE_COLOR,
    ZERO_COLOR,
    FigureResult,
    _decade_formatter,
    _edges,
    _field,
    _layer_ticks,
    _new_figure,
    _no_data,
    _step_axis,
    _style,
    metric_label,
)
from gradlight.report.summary import layer_grid

__all__ = ["FINDING_MARKERS", "heatmap_data", "heatmap_figure"]

#: Marker of each finding kind on the heat map.
FINDING_MARKERS = {
    "vanishing": "v",
    "exploding": "^",
    "non_finite": "X",
    "dormant": "s",
    "saturated": "D",
    "dead_units": "o",
}


def heatmap_data(
    frame: pd.DataFrame, findings: Iterable[Mapping[str, Any] | Any] = (), *, metric: str = "grad_l2"
) -> dict[str, Any]:
    """What :func:`heatmap_figure` draws, without drawing it.

    Args:
        frame: A history in long format.
        findings: Findings to mark (see :func:`heatmap_figure`).
        metric: The per-layer metric to show.

    Returns:
        ``log10`` (the ``(layers, steps)`` array of ``log10(metric)``, NaN where not recorded), ``present``
        (where recorded), ``layers``, ``depths``, ``steps``, and the findings drawn as ``finding_steps``,
        ``finding_rows``, ``finding_kinds``; ``colorbar_ticks`` (whole decades) when anything was recorded.

    Example:
        >>> from gradlight import load_history
        >>> data = heatmap_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> data["log10"].shape  # (layers, steps)  # doctest: +SKIP
    """
    grid = layer_grid(frame, metric)
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(grid.values)
    row_of = {name: i for i, name in enumerate(grid.layers)}
    f_steps, f_rows, f_kinds = [], [], []
    for finding in findings:
        row = _finding_row(finding, row_of)
        step = _field(finding, "step", -1)
        if row is None or step is None or int(step) < 0:
            continue
        f_steps.append(int(step))
        f_rows.append(row)
        f_kinds.append(str(_field(finding, "kind", "")))
    data: dict[str, Any] = {
        "metric": metric,
        "log10": log,
        "values": grid.values,
        "present": grid.present,
        "layers": list(grid.layers),
        "depths": grid.depths,
        "steps": grid.steps,
        "finding_steps": np.asarray(f_steps, dtype=np.int64),
        "finding_rows": np.asarray(f_rows, dtype=np.int64),
        "finding_kinds": f_kinds,
    }
    if not grid.empty:
        finite = log[np.isfinite(log)]
        low, high = (math.floor(float(finite.min())), math.ceil(float(finite.max()))) if finite.size else (-1, 0)
        vmin, vmax, stride = _decade_range(low, high)
        data["colorbar_range"] = (vmin, vmax)
        data["colorbar_ticks"] = list(range(vmin, vmax + 1, stride))
    return data


def heatmap_figure(
    frame: pd.DataFrame,
    findings: Iterable[Mapping[str, Any] | Any] = (),
    *,
    metric: str = "grad_l2",
    title: str | None = None,
) -> FigureResult:
    """Heat map of ``log10(metric)``: layers in forward order (depth 0 at the top) by optimizer step.

    Zero norms (``log10 = -inf``) are drawn black, non-finite values magenta and steps a layer was not
    recorded light grey; the colour bar is in decades, labelled at whole decades up to the top one.
    Findings are marked at their onset: the row of their ``layer`` at their ``step`` (the first step the
    condition held; the diagnosis reports it at ``reported_step``, a patience window later). A finding about
    an activation site (``saturated``, ``dead_units``), which has no row, goes on the layer the site feeds
    (``evidence["feeds"]``), else on the first of its ``layers`` that has a row.

    Args:
        frame: A history in long format.
        findings: Findings to mark: dicts (``findings.jsonl`` lines) or objects (``gradlight.diagnosis.Finding``)
            with ``kind``, ``layer``, ``step`` and optionally ``evidence`` and ``layers``.
        metric: The per-layer metric to show.
        title: Figure title.

    Returns:
        The figure, with the arrays of :func:`heatmap_data` as ``data``.

    Example:
        >>> from gradlight import load_history
        >>> result = heatmap_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> result.figure.savefig("heatmap.png")  # doctest: +SKIP
    """
    data = heatmap_data(frame, findings, metric=metric)
    shown_title = title or _heatmap_title(metric)
    fig = draw_heatmap(data, shown_title)
    caption = (
        f"Each row is a layer (input at the top), each column a recorded step; colour is the "
        f"{metric_label(metric)} on a log scale. A dark band at the top that stays dark is the picture of "
        "vanishing gradients."
    )
    if len(data["finding_steps"]):
        caption += (
            " Markers show each diagnosis finding at its onset, the first step its condition held (it is "
            "reported a few logged steps later); findings about an activation site sit on the layer it feeds."
        )
    return FigureResult(fig, data, "heatmap", shown_title, caption if "colorbar_ticks" in data else "")


def _height(num_layers: int) -> float:
    return float(np.clip(1.6 + 0.15 * min(num_layers, 36), 3.0, 7.5))


def draw_heatmap(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`heatmap_data` (also used for the backward-signal heat map)."""
    height = _height(len(data["layers"]))
    with _style():
        fig = _new_figure(height)
        ax = fig.add_subplot()
        ax.set_title(title)
        if "colorbar_ticks" not in data:
            _no_data(fig, ax, f"no {metric_label(data['metric'])} recorded")
            return fig
        mesh = _draw_cells(ax, data)
        max_ticks = max(4, int((height - 1.2) * 72 / 10.5))
        _layer_ticks(ax.yaxis, data["layers"], max_ticks)
        ax.tick_params(axis="y", labelsize=7 if len(data["layers"]) > 20 else 8, length=2)
        _step_axis(ax)
        _step_ticks(ax, data["steps"])
        ax.set_ylabel("layer (forward order, input at top)")
        colorbar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04, aspect=max(15.0, (height - 1.3) / 0.14))
        colorbar.locator = FixedLocator(data["colorbar_ticks"])
        colorbar.formatter = _decade_formatter()
        colorbar.update_ticks()
        colorbar.set_label(f"{metric_label(data['metric'])} (log scale)")
        handles = _draw_findings(ax, data)
        for mask, color, label in _special_cells(data):
            if mask.any():
                handles.append(Patch(facecolor=color, edgecolor="#777777", linewidth=0.5, label=label))
        _legend_above(ax, handles)
    return fig


def _special_cells(data: dict[str, Any]) -> list[tuple[np.ndarray, str, str]]:
    """``(mask, colour, label)`` of the zero, non-finite and not-recorded cells."""
    present, log = data["present"], data["log10"]
    zero = present & (log == -np.inf)
    nonfinite = present & ~np.isfinite(data["values"])
    return [
        (zero, ZERO_COLOR, "zero"),
        (nonfinite, NONFINITE_COLOR, "NaN/inf"),
        (~present, MISSING_COLOR, "not recorded"),
    ]


def _draw_cells(ax: Axes, data: dict[str, Any]) -> Any:
    vmin, vmax = data["colorbar_range"]
    (zero, _, _), (nonfinite, _, _), (missing, _, _) = _special_cells(data)
    display = data["log10"].copy()
    display[zero] = vmin - 1.0
    display[nonfinite] = vmax + 1.0
    display[missing] = np.nan
    cmap: Colormap = mpl.colormaps["viridis"].with_extremes(under=ZERO_COLOR, over=NONFINITE_COLOR, bad=MISSING_COLOR)
    num_layers = len(data["layers"])
    mesh = ax.pcolormesh(
        _edges(data["steps"].astype(np.float64)),
        np.arange(num_layers + 1) - 0.5,
        np.ma.masked_invalid(display),
        cmap=cmap,
        norm=Normalize(vmin=vmin, vmax=vmax),
        shading="flat",
        rasterized=True,
    )
    ax.set_ylim(num_layers - 0.5, -0.5)
    ax.spines[["top", "right"]].set_visible(True)
    return mesh


def _step_ticks(ax: Axes, steps: np.ndarray) -> None:
    """Ticks on recorded steps only when there are few of them (no fractional steps between two columns)."""
    if 0 < len(steps) <= 8:
        ax.set_xticks(steps.astype(np.float64))
        ax.set_xticklabels([str(int(step)) for step in steps])


def _draw_findings(ax: Axes, data: dict[str, Any]) -> list[Any]:
    """Mark the findings; several in one cell (e.g. vanishing and dormant) side by side. Returns legend handles."""
    kinds, steps, rows = data["finding_kinds"], data["finding_steps"], data["finding_rows"]
    seen: dict[tuple[int, int], int] = {}
    shift = np.zeros(len(kinds))
    width = float(data["steps"][-1] - data["steps"][0]) if len(data["steps"]) > 1 else 1.0
    for i, cell in enumerate(zip(steps.tolist(), rows.tolist())):
        shift[i] = seen.get(cell, 0) * 0.018 * width
        seen[cell] = seen.get(cell, 0) + 1
    handles: list[Any] = []
    for kind in dict.fromkeys(kinds):
        marker = FINDING_MARKERS.get(kind, "*")
        mask = np.asarray([k == kind for k in kinds])
        ax.scatter(
            steps[mask] + shift[mask],
            rows[mask],
            marker=marker,
            s=34,
            facecolor="white",
            edgecolor="black",
            linewidth=0.8,
            zorder=3,
            clip_on=False,
        )
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker=marker,
                markerfacecolor="white",
                markeredgecolor="black",
                markersize=6,
                label=kind.replace("_", " "),
            )
        )
    return handles


def _legend_above(ax: Axes, handles: list[Any]) -> None:
    if not handles:
        return
    rows = math.ceil(len(handles) / 4)  # at most 4 entries a row: the legend stays as wide as the map
    ax.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=math.ceil(len(handles) / rows),
        borderaxespad=0.2,
        handletextpad=0.4,
        columnspacing=1.0,
    )
    ax.set_title(ax.get_title(), pad=6 + 14 * rows)


def _heatmap_title(metric: str) -> str:
    label = metric_label(metric)
    return f"{label[:1].upper()}{label[1:]} per layer and step"


def _finding_row(finding: Mapping[str, Any] | Any, row_of: Mapping[str, int]) -> int | None:
    """The heat-map row of a finding: its layer's, else the layer its activation site feeds, else a listed one."""
    candidates: list[Any] = [_field(finding, "layer", "")]
    evidence = _field(finding, "evidence", None)
    if isinstance(evidence, Mapping):
        candidates.append(evidence.get("feeds"))
    layers = _field(finding, "layers", None)
    if isinstance(layers, (list, tuple)):
        candidates.extend(layers)
    for name in candidates:
        if name is not None and str(name) in row_of:
            return row_of[str(name)]
    return None


def _decade_range(vmin: int, vmax: int, max_ticks: int = 8) -> tuple[int, int, int]:
    """Colour-bar range and tick stride in whole decades: both ends multiples of the stride, so both labelled.

    Example:
        >>> _decade_range(-7, 2)  # 10 decades do not fit 8 ticks: every second one, from -8 to 2
        (-8, 2, 2)
    """
    vmax = max(vmax, vmin + 1)
    for stride in (1, 2, 3, 5, 10, 20, 50, 100):
        low, high = math.floor(vmin / stride) * stride, math.ceil(vmax / stride) * stride
        if (high - low) // stride + 1 <= max_ticks:
            return low, high, stride
    stride = math.ceil((vmax - vmin) / (max_ticks - 1))
    return math.floor(vmin / stride) * stride, math.ceil(vmax / stride) * stride, stride
