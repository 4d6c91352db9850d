"""How a report shows a run: pure functions from a history DataFrame to a matplotlib Figure.

Every function returns a :class:`FigureResult`: the figure, the arrays it plots (so tests and users can
check them against the history), a short name for file names and a caption. Figures are built with
:class:`matplotlib.figure.Figure` directly (no pyplot state, no GUI backend), sized for a paper column
(7 inches wide) and saved by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, MaxNLocator
from matplotlib.transforms import ScaledTranslation

from gradlight.history import GLOBAL_LAYER
from gradlight.report.summary import (
    Run,
    activation_sites,
    early_late_series,
    global_norm_series,
    global_series,
    layer_grid,
    profile_slope,
)

__all__ = [
    "FINDING_MARKERS",
    "METRIC_LABELS",
    "PROFILE_VIEWS",
    "RUN_COLORS",
    "SIGNAL_VIEWS",
    "UPDATE_RATIO_BAND",
    "UPDATE_RATIO_TARGET",
    "FigureResult",
    "activation_figure",
    "compare_gains_figure",
    "compare_profiles_figure",
    "compare_ratios_figure",
    "figure_builders",
    "gain_profile_data",
    "gain_profile_figure",
    "global_norm_figure",
    "heatmap_figure",
    "layer_sizes",
    "metric_label",
    "profile_figure",
    "ratio_figure",
    "repeated_block",
    "run_figures",
    "run_style",
    "shorten_label",
    "signal_heatmap_figure",
    "update_ratio_figure",
]

#: The update-to-parameter ratio rule of thumb: about 1e-3 per step ...
UPDATE_RATIO_TARGET = 1e-3
#: ... within half a decade either side.
UPDATE_RATIO_BAND = (10**-3.5, 10**-2.5)

#: Marker of each finding kind on the heat map.
FINDING_MARKERS = {
    "vanishing": "v",
    "exploding": "^",
    "non_finite": "X",
    "dormant": "s",
    "saturated": "D",
    "dead_units": "o",
}

WIDTH = 7.0
ZERO_COLOR = "#000000"
NONFINITE_COLOR = "#e8198b"
MISSING_COLOR = "#d9d9d9"
#: One colour per run (Okabe-Ito, with a dark wine instead of its yellow, which hardly shows on white).
RUN_COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#882255")
#: Line style and marker of the runs past each full round of :data:`RUN_COLORS` (run 9 is dashed, ...).
RUN_LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)))
RUN_MARKERS = ("o", "s", "^", "D")
#: Readable names of the recorded metrics, for titles, axes and legends.
METRIC_LABELS = {
    "grad_l2": "gradient L2 norm",
    "grad_max_abs": "largest |gradient| element",
    "grad_nonfinite": "non-finite gradient elements",
    "param_l2": "parameter L2 norm",
    "update_ratio": "update-to-parameter ratio",
    "global_grad_l2": "global gradient norm",
    "early_late_ratio": "early-to-late gradient ratio",
    "act_saturation": "saturated outputs",
    "act_dead": "dead units",
    "loss": "loss",
    "signal_l2": "backward signal L2 norm",
    "signal_rms": "backward signal RMS per element",
    "signal_in_l2": "backward signal at the block input",
    "signal_gain": "block gain (decades)",
}
ZERO_LABEL = "0 (exactly)"
RATIO_AXIS_LABEL = "gradient norm, first / last layer"
ZERO_MARKER = "v"
STYLE: dict[Any, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.color": "#e0e0e0",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "savefig.dpi": 150,
    "figure.dpi": 100,
}


@dataclass
class FigureResult:
    """A drawn figure and what it shows.

    Attributes:
        figure: The matplotlib figure.
        data: The plotted arrays, by name.
        name: Short name, used in file names and logger tags (``heatmap``, ``profile``, ...).
        title: One-line title.
        caption: How to read the figure, in a sentence or two.
    """

    figure: Figure
    data: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    title: str = ""
    caption: str = ""


@contextmanager
def _style() -> Iterator[None]:
    with mpl.rc_context(STYLE):
        yield


def _new_figure(height: float, width: float = WIDTH) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def shorten_label(name: str, limit: int = 28) -> str:
    """Shorten a layer name for a tick label, keeping its end (the most specific part).

    Example:
        >>> shorten_label("model.encoder.layers.11.self_attn.out_proj", limit=20)
        '…self_attn.out_proj'
    """
    if len(name) <= limit:
        return name
    tail = name[-limit:]
    cut = tail.find(".")
    if 0 <= cut < limit // 3:
        tail = tail[cut + 1 :]
    return "…" + tail


def _thin(count: int, max_ticks: int) -> np.ndarray:
    """Evenly spaced tick positions, at most ``max_ticks`` of them, always including the first."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = max(1, math.ceil(count / max(1, max_ticks)))
    return np.arange(0, count, stride, dtype=np.int64)


def _layer_ticks(axis: Any, names: Sequence[str], max_ticks: int, limit: int = 28) -> None:
    positions = _thin(len(names), max_ticks)
    axis.set_major_locator(FixedLocator(positions.tolist()))
    axis.set_ticklabels([shorten_label(names[i], limit) for i in positions])


def _decade_formatter() -> FuncFormatter:
    def fmt(value: float, _pos: int | None) -> str:
        if not math.isfinite(value):
            return ""
        if abs(value - round(value)) < 1e-9:
            return f"$10^{{{round(value)}}}$"
        return f"$10^{{{value:.1f}}}$"

    return FuncFormatter(fmt)


class _ReadableLogFormatter(LogFormatterSciNotation):
    """Decades as ``10^k``; on an axis spanning under two decades, plain numbers (``4``, ``6``, ``10``).

    Matplotlib labels minor ticks by itself on a short log axis, but as ``4 x 10^0``, which reads badly.
    """

    def __call__(self, x: float, pos: int | None = None) -> str:
        text = super().__call__(x, pos)
        if not text or self.axis is None:
            return text
        low, high = sorted(self.axis.get_view_interval())
        if low > 0 and math.log10(high / low) < 2 and 1e-3 <= abs(x) < 1e4:
            return f"{x:g}"
        return text


def _log_axis(ax: Axes) -> None:
    """Log y axis labelled by :class:`_ReadableLogFormatter`."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_ReadableLogFormatter())
    ax.yaxis.set_minor_formatter(_ReadableLogFormatter(labelOnlyBase=False))


def _step_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel("optimizer step")


def _legend_right(ax: Axes, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    if handles is None or labels is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles=handles, labels=labels, loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0.0)


def metric_label(metric: str) -> str:
    """A readable name of a metric for titles and axes (the raw name when it has none).

    Example:
        >>> metric_label("grad_l2"), metric_label("my_metric")
        ('gradient L2 norm', 'my_metric')
    """
    return METRIC_LABELS.get(metric, metric)


def run_style(index: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``index``-th run of a comparison, distinct for 32 runs.

    The first 8 runs are solid lines in the 8 colours; the next 8 reuse the colours dashed with square
    markers, then dash-dotted with triangles, then dash-dot-dotted with diamonds.

    Example:
        >>> run_style(0)["linestyle"], run_style(8)["linestyle"], run_style(8)["color"] == run_style(0)["color"]
        ('-', '--', True)
    """
    cycle = index // len(RUN_COLORS)
    return {
        "color": RUN_COLORS[index % len(RUN_COLORS)],
        "linestyle": RUN_LINESTYLES[cycle % len(RUN_LINESTYLES)],
        "marker": RUN_MARKERS[cycle % len(RUN_MARKERS)],
    }


def _positive(values: np.ndarray) -> np.ndarray:
    """Values fit for a log axis: non-positive and non-finite become NaN (a gap)."""
    out = np.asarray(values, dtype=np.float64).copy()
    out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out


def _plot_log(
    ax: Axes, x: np.ndarray, y: np.ndarray, *, color: Any, dodge: float = 0.0, zorder: float = 2.5, **kwargs: Any
) -> bool:
    """Plot ``y`` on a log axis; exact zeros, which a log axis cannot show, as markers on its bottom edge.

    Args:
        ax: The axes (log y).
        x: Positions.
        y: Values; non-finite and negative ones are gaps.
        color: Line and zero-marker colour.
        dodge: Horizontal shift of the zero markers in points, so the zeros of series that share x
            positions (the steps of a profile) sit side by side.
        zorder: Line z-order.
        **kwargs: Passed to ``ax.plot`` for the line.

    Returns:
        Whether there were zeros (then add :func:`_zero_handle` to the legend).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ax.plot(x, _positive(y), color=color, zorder=zorder, **kwargs)
    return _zero_markers(ax, x, y, color=color, dodge=dodge)


def _zero_markers(ax: Axes, x: np.ndarray, y: np.ndarray, *, color: Any, dodge: float = 0.0) -> bool:
    zero = np.asarray(y) == 0
    if not zero.any():
        return False
    where = np.asarray(x, dtype=np.float64)[zero]
    # x in data, y in axes fraction (0 is the bottom edge), lifted so the triangle's tip rests on the edge.
    lift = ScaledTranslation(dodge / 72.0, 3.5 / 72.0, ax.figure.dpi_scale_trans)
    ax.plot(
        where,
        np.zeros(where.size),
        transform=ax.get_xaxis_transform() + lift,
        linestyle="none",
        marker=ZERO_MARKER,
        markersize=5,
        markerfacecolor=color,
        markeredgecolor="white",
        markeredgewidth=0.5,
        clip_on=False,
        zorder=4,
        gid="zeros",
    )
    ax.update_datalim(np.column_stack([where, np.ones(where.size)]), updatey=False)  # the x range includes them
    return True


def _dodge(index: int, count: int, spacing: float = 4.5) -> float:
    """Shift in points of series ``index`` of ``count`` whose zero markers share x positions."""
    return (index - (count - 1) / 2) * spacing


def _zero_handle() -> Line2D:
    return Line2D(
        [],
        [],
        linestyle="none",
        marker=ZERO_MARKER,
        markersize=5,
        markerfacecolor="#555555",
        markeredgecolor="white",
        markeredgewidth=0.5,
        label=ZERO_LABEL,
    )


def _legend(ax: Axes, zeros: bool, *, minimum: int = 2, **kwargs: Any) -> None:
    """A legend of the labelled artists (plus the zero marker when there were zeros), if at least ``minimum``."""
    handles, labels = ax.get_legend_handles_labels()
    if zeros:
        handles.append(_zero_handle())
        labels.append(ZERO_LABEL)
    if len(handles) >= minimum:
        ax.legend(handles=handles, labels=labels, **kwargs)


def _edges(centers: np.ndarray) -> np.ndarray:
    centers = np.asarray(centers, dtype=np.float64)
    if centers.size == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mids = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[centers[0] - (mids[0] - centers[0])], mids, [centers[-1] + (centers[-1] - mids[-1])]])


def _field(item: Any, name: str, default: Any) -> Any:
    """``item[name]`` for a mapping, ``item.name`` otherwise."""
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def _balanced_line(ax: Axes) -> None:
    """A dotted line at 1 labelled in place (a legend entry would be far from it)."""
    ax.axhline(1.0, color="#888888", linestyle=":", linewidth=1.0)
    ax.text(
        0.995,
        1.0,
        "balanced (1)",
        transform=ax.get_yaxis_transform(),
        ha="right",
        va="bottom",
        fontsize=7.5,
        color="#666666",
    )


def _no_data(fig: Figure, ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------- heat map
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
        The figure; ``data["log10"]`` is the ``(layers, steps)`` array of ``log10(metric)`` (NaN where not
        recorded), with ``data["layers"]``, ``data["steps"]``, ``data["depths"]``, and the findings drawn as
        ``data["finding_steps"]``, ``data["finding_rows"]``, ``data["finding_kinds"]``.

    Example:
        >>> from gradlight import load_history
        >>> result = heatmap_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> result.figure.savefig("heatmap.png")  # doctest: +SKIP
    """
    grid = layer_grid(frame, metric)
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(grid.values)
    layers, steps = grid.layers, grid.steps
    row_of = {name: i for i, name in enumerate(layers)}
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
        "log10": log,
        "layers": list(layers),
        "depths": grid.depths,
        "steps": steps,
        "finding_steps": np.asarray(f_steps, dtype=np.int64),
        "finding_rows": np.asarray(f_rows, dtype=np.int64),
        "finding_kinds": f_kinds,
    }
    num_layers = len(layers)
    height = float(np.clip(1.6 + 0.15 * min(num_layers, 36), 3.0, 7.5))
    with _style():
        fig = _new_figure(height)
        ax = fig.add_subplot()
        ax.set_title(title or _heatmap_title(metric))
        if grid.empty:
            _no_data(fig, ax, f"no {metric_label(metric)} recorded")
            return FigureResult(fig, data, "heatmap", ax.get_title(), "")
        finite = log[np.isfinite(log)]
        if finite.size:
            vmin, vmax = math.floor(float(finite.min())), math.ceil(float(finite.max()))
        else:
            vmin, vmax = -1, 0
        vmin, vmax, stride = _decade_range(vmin, vmax)
        zero = grid.present & (log == -np.inf)
        nonfinite = grid.present & ~np.isfinite(grid.values)
        display = log.copy()
        display[zero] = vmin - 1.0
        display[nonfinite] = vmax + 1.0
        display[~grid.present] = np.nan
        cmap: Colormap = mpl.colormaps["viridis"].with_extremes(
            under=ZERO_COLOR, over=NONFINITE_COLOR, bad=MISSING_COLOR
        )
        mesh = ax.pcolormesh(
            _edges(steps.astype(np.float64)),
            np.arange(num_layers + 1) - 0.5,
            np.ma.masked_invalid(np.where(np.isnan(display), np.nan, display)),
            cmap=cmap,
            norm=Normalize(vmin=vmin, vmax=vmax),
            shading="flat",
            rasterized=True,
        )
        ax.set_ylim(num_layers - 0.5, -0.5)
        ax.spines[["top", "right"]].set_visible(True)
        max_ticks = max(4, int((height - 1.2) * 72 / 10.5))
        _layer_ticks(ax.yaxis, layers, max_ticks)
        ax.tick_params(axis="y", labelsize=7 if num_layers > 20 else 8, length=2)
        _step_axis(ax)
        ax.set_ylabel("layer (forward order, input at top)")
        colorbar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04, aspect=max(15.0, (height - 1.3) / 0.14))
        colorbar.locator = FixedLocator(list(range(vmin, vmax + 1, stride)))
        colorbar.formatter = _decade_formatter()
        colorbar.update_ticks()
        colorbar.set_label(f"{metric_label(metric)} (log scale)")
        data["colorbar_ticks"] = list(range(vmin, vmax + 1, stride))
        handles: list[Any] = []
        for kind in dict.fromkeys(f_kinds):
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker=FINDING_MARKERS.get(kind, "*"),
                    markerfacecolor="white",
                    markeredgecolor="black",
                    markersize=6,
                    label=kind.replace("_", " "),
                )
            )
        # Several findings in one cell (e.g. vanishing and dormant) sit side by side, not on top of each other.
        seen: dict[tuple[int, int], int] = {}
        shift = np.zeros(len(f_kinds))
        width = float(steps[-1] - steps[0]) if len(steps) > 1 else 1.0
        for i, cell in enumerate(zip(f_steps, f_rows)):
            shift[i] = seen.get(cell, 0) * 0.018 * width
            seen[cell] = seen.get(cell, 0) + 1
        for kind in dict.fromkeys(f_kinds):
            mask = np.asarray([k == kind for k in f_kinds])
            ax.scatter(
                data["finding_steps"][mask] + shift[mask],
                data["finding_rows"][mask],
                marker=FINDING_MARKERS.get(kind, "*"),
                s=34,
                facecolor="white",
                edgecolor="black",
                linewidth=0.8,
                zorder=3,
                clip_on=False,
            )
        for mask, color, label in (
            (zero, ZERO_COLOR, "zero"),
            (nonfinite, NONFINITE_COLOR, "NaN/inf"),
            (~grid.present, MISSING_COLOR, "not recorded"),
        ):
            if mask.any():
                handles.append(Patch(facecolor=color, edgecolor="#777777", linewidth=0.5, label=label))
        if handles:
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
    caption = (
        f"Each row is a layer (input at the top), each column a recorded step; colour is the "
        f"{metric_label(metric)} on a log scale. A dark band at the top that stays dark is the picture of "
        "vanishing gradients."
    )
    if f_steps:
        caption += (
            " Markers show each diagnosis finding at its onset, the first step its condition held (it is "
            "reported a few logged steps later); findings about an activation site sit on the layer it feeds."
        )
    return FigureResult(fig, data, "heatmap", title or _heatmap_title(metric), caption)


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


# ------------------------------------------------------------------------------------------- profile
def _profile_steps(steps: np.ndarray, count: int = 3) -> np.ndarray:
    if len(steps) <= count:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(np.int64))
    return steps[picks]


def _depth_axis(ax: Axes, layers: Sequence[str], max_names: int = 24) -> None:
    """Layer names as x tick labels (horizontal; call :func:`_rotate_if_crowded` once the figure is drawn)."""
    if len(layers) <= max_names:
        ax.set_xticks(np.arange(len(layers)))
        ax.set_xticklabels([shorten_label(name, 20) for name in layers])
        ax.set_xlabel("layer (forward order)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.set_xlabel("depth (layer index in forward order)")
    ax.set_xlim(-0.5, max(len(layers) - 0.5, 0.5))


def _rotate_if_crowded(fig: Figure, ax: Axes, gap_points: float = 3.0) -> bool:
    """Rotate the x tick labels by 45 degrees if, laid out horizontally, two neighbours would overlap.

    Returns:
        Whether the labels were rotated.
    """
    labels = [label for label in ax.get_xticklabels() if label.get_text()]
    if len(labels) < 2:
        return False
    fig.draw_without_rendering()  # runs the constrained layout: the labels' final positions
    extents = sorted((label.get_window_extent() for label in labels), key=lambda box: box.x0)
    gap = gap_points * fig.dpi / 72.0
    crowded = any(right.x0 < left.x1 + gap for left, right in pairwise(extents))
    if crowded:
        ax.tick_params(axis="x", labelrotation=45, labelrotation_mode="anchor")
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    return crowded


#: Views of the gradient-flow profile: one point per layer (L2), per layer per element (RMS), per block.
PROFILE_VIEWS = ("auto", "layer", "element", "block")


def repeated_block(layer: str) -> str:
    """The repeated block a layer belongs to: its name up to the first all-digit component (else itself).

    Repeated blocks are numbered children of a ``ModuleList`` / ``Sequential`` (GPT-2's ``transformer.h.3``,
    ResNet's ``layer1.0``, YOLO's ``model.3``); layers outside them (embeddings, final norms) stay alone.

    Example:
        >>> repeated_block("transformer.h.3.attn.c_attn"), repeated_block("transformer.ln_f")
        ('transformer.h.3', 'transformer.ln_f')
    """
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def _has_repeated_blocks(layers: Sequence[str]) -> bool:
    """Whether at least two repeated blocks hold two or more layers each."""
    counts: dict[str, int] = {}
    for layer in layers:
        block = repeated_block(layer)
        counts[block] = counts.get(block, 0) + 1
    return sum(1 for count in counts.values() if count >= 2) >= 2


def _profile_rows(
    values: np.ndarray, layers: list[str], view: str, sizes: Mapping[str, int] | None
) -> tuple[np.ndarray, list[str]]:
    """``(layers, steps)`` L2 norms as the rows of a view: per layer, per element, or per repeated block."""
    if view == "layer":
        return values, layers
    if view == "element":
        if sizes is None or any(sizes.get(layer, 0) <= 0 for layer in layers):
            missing = [layer for layer in layers if sizes is None or sizes.get(layer, 0) <= 0][:3]
            raise ValueError(
                f"`view='element'` needs the number of elements of every layer in `sizes` (run.json's "
                f"`layers`); missing for {missing}."
            )
        return values / np.sqrt(np.asarray([float(sizes[layer]) for layer in layers]))[:, None], layers
    blocks = list(dict.fromkeys(repeated_block(layer) for layer in layers))  # first appearance: depth order
    index = {block: i for i, block in enumerate(blocks)}
    squares = np.zeros((len(blocks), values.shape[1]))
    seen = np.zeros((len(blocks), values.shape[1]), dtype=bool)
    for row, layer in zip(values, layers):
        i = index[repeated_block(layer)]
        present = ~np.isnan(row)
        squares[i, present] += row[present] ** 2  # a NaN (not recorded) layer leaves its block's others
        seen[i] |= present
    return np.where(seen, np.sqrt(squares), np.nan), blocks


def profile_figure(
    frame: pd.DataFrame,
    steps: Sequence[int] | None = None,
    *,
    view: str = "auto",
    sizes: Mapping[str, int] | None = None,
    title: str | None = None,
) -> FigureResult:
    """Gradient-flow profile: gradient norm against depth at a few steps (default: first, middle, last).

    On the log axis a vanishing network is a straight line rising from the input to the output; the
    legend gives each line's slope in decades per point.

    A layer's L2 norm grows with its size, so in a model of repeated blocks the per-layer line is a
    sawtooth (a LayerNorm's 128 parameters next to a Linear's 12,288) that hides the trend over depth.
    ``view`` picks what a point is:

    * ``"layer"``: each layer's L2 norm;
    * ``"element"``: each layer's RMS per element, ``L2 / sqrt(elements)`` (needs ``sizes``); smaller
      teeth, but norms and linear maps still differ per element;
    * ``"block"``: each repeated block's L2 norm over all its layers (``sqrt`` of the summed squares; see
      :func:`repeated_block`), so identical blocks are compared whole: no sawtooth at all;
    * ``"auto"`` (default): ``"block"`` when the model has repeated blocks of several layers, else
      ``"layer"``.

    Args:
        frame: A history in long format.
        steps: The steps to draw (default: first, middle and last recorded).
        view: One of :data:`PROFILE_VIEWS`.
        sizes: ``layer -> number of parameter elements`` (``run.json``'s ``layers``), for ``"element"``.
        title: Figure title.

    Returns:
        The figure; ``data["grad_l2"]`` is ``(len(steps), points)`` in the chosen view, with
        ``data["view"]``, ``data["steps"]``, ``data["layers"]`` (the points: layers or blocks),
        ``data["depths"]`` and ``data["slopes"]``.

    Raises:
        ValueError: For an unknown ``view``, steps not in the history, or ``"element"`` without sizes.

    Example:
        >>> result = profile_figure(load_history("runs/exp1/gradlight"), view="block")  # doctest: +SKIP
        >>> result.data["slopes"]  # doctest: +SKIP
    """
    if view not in PROFILE_VIEWS:
        raise ValueError(f"`view` must be one of {PROFILE_VIEWS}, got {view!r}.")
    grid = layer_grid(frame)
    if view == "auto":
        view = "block" if _has_repeated_blocks(grid.layers) else "layer"
    shown, points = _profile_rows(grid.values, list(grid.layers), view, sizes)
    depths = np.arange(len(points), dtype=np.int64) if view == "block" else grid.depths
    chosen = _profile_steps(grid.steps) if steps is None else np.asarray(list(steps), dtype=np.int64)
    columns = {int(step): j for j, step in enumerate(grid.steps)}
    unknown = [int(s) for s in chosen if int(s) not in columns]
    if unknown:
        raise ValueError(f"steps {unknown} are not in the history (recorded: {grid.steps[:5].tolist()}...)")
    values = np.stack([shown[:, columns[int(s)]] for s in chosen]) if len(chosen) else np.zeros((0, len(points)))
    slopes = np.asarray([profile_slope(depths, row) for row in values])
    data: dict[str, Any] = {
        "grad_l2": values,
        "view": view,
        "steps": chosen,
        "layers": points,
        "depths": depths,
        "slopes": slopes,
    }
    many = len(points) > 24
    with _style():
        fig = _new_figure(3.4 if many else 3.6)
        ax = fig.add_subplot()
        ax.set_title(title or "Gradient-flow profile")
        if not len(chosen):
            _no_data(fig, ax, "no gradient norm recorded")
        else:
            colors = mpl.colormaps["viridis"](np.linspace(0.85, 0.05, len(chosen)))
            x = np.arange(len(points))
            zeros = False
            unit = "block" if view == "block" else "layer"
            for k, (row, step, slope, color) in enumerate(zip(values, chosen, slopes, colors)):
                label = f"step {int(step)}"
                if math.isfinite(slope):
                    label += f" (slope {slope:+.2f} dec/{unit})"
                dodge = _dodge(k, len(chosen))
                zeros |= _plot_log(ax, x, row, marker="o" if not many else None, color=color, label=label, dodge=dodge)
            _log_axis(ax)
            ax.grid(True, axis="y", which="major")
            _depth_axis(ax, points)
            if view == "block":
                ax.set_xlabel(ax.get_xlabel().replace("layer", "block (repeated blocks whole)"))
            ax.set_ylabel(_PROFILE_AXIS[view])
            _legend(ax, zeros, minimum=1, loc="best")
            _rotate_if_crowded(fig, ax)
    caption = (
        f"{_PROFILE_CAPTION[view]} at the first, middle and last recorded step. A line rising steeply "
        "from input to output (positive slope, in decades per point) means the first layers barely learn. "
        "Triangles on the bottom edge are points whose gradient was exactly zero."
    )
    return FigureResult(fig, data, "profile", title or "Gradient-flow profile", caption)


_PROFILE_AXIS = {
    "layer": f"{metric_label('grad_l2')} (log scale)",
    "element": "gradient RMS per element (log scale)",
    "block": "gradient L2 norm per block (log scale)",
}
_PROFILE_CAPTION = {
    "layer": "Gradient norm of each layer",
    "element": "Gradient RMS per element of each layer (L2 norm over the square root of its size)",
    "block": (
        "Gradient norm of each repeated block (all its layers together: a layer's norm grows with its "
        "size, so whole blocks, not their layers, show the trend over depth) and of each layer outside them"
    ),
}


# ------------------------------------------------------------------------------------ over the steps
def ratio_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult:
    """Early-to-late gradient ratio over the steps (log scale, 1 = balanced).

    Returns:
        The figure; ``data["steps"]`` and ``data["ratio"]``.

    Example:
        >>> result = ratio_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    series = early_late_series(frame)
    data: dict[str, Any] = {"steps": series.index.to_numpy(), "ratio": series.to_numpy(dtype=np.float64)}
    with _style():
        fig = _new_figure(2.8)
        ax = fig.add_subplot()
        ax.set_title(title or "Early-to-late gradient ratio")
        if series.empty:
            _no_data(fig, ax, "no early-to-late ratio recorded")
        else:
            zeros = _plot_log(ax, data["steps"], data["ratio"], color=RUN_COLORS[0])
            _balanced_line(ax)
            _log_axis(ax)
            ax.grid(True, axis="y", which="major")
            _step_axis(ax)
            ax.set_ylabel(RATIO_AXIS_LABEL)
            _legend(ax, zeros, minimum=1, loc="best")
    caption = (
        "Gradient norm of the first layer(s) over that of the last layer(s). Far below 1: the input side "
        "receives little gradient (vanishing); far above 1: it receives too much (exploding). Triangles on "
        "the bottom edge are steps where the first layers' gradient was exactly zero."
    )
    return FigureResult(fig, data, "ratio", title or "Early-to-late gradient ratio", caption)


def global_norm_figure(
    frame: pd.DataFrame,
    clip_value: float | None = None,
    clip_algorithm: str = "norm",
    *,
    title: str | None = None,
) -> FigureResult:
    """Global gradient norm over the steps, with the clip value as a line; the loss below it if recorded.

    Args:
        frame: A history in long format.
        clip_value: The gradient clip value, if clipping was on.
        clip_algorithm: ``"norm"`` (the line is drawn on the global norm) or ``"value"`` (the line is drawn
            on the largest absolute gradient element, which is what value clipping caps).
        title: Figure title.

    Returns:
        The figure; ``data["steps"]``, ``data["global_grad_l2"]``, and when present ``data["loss_steps"]``,
        ``data["loss"]``, ``data["max_abs"]``, ``data["clip_value"]``.

    Example:
        >>> result = global_norm_figure(load_history("runs/exp1/gradlight"), clip_value=1.0)  # doctest: +SKIP
    """
    norm = global_norm_series(frame)
    loss = global_series(frame, "loss")
    max_abs = global_series(frame, "global_grad_max_abs") if clip_algorithm == "value" else pd.Series()
    data: dict[str, Any] = {
        "steps": norm.index.to_numpy(),
        "global_grad_l2": norm.to_numpy(dtype=np.float64),
        "clip_value": clip_value,
    }
    has_loss = bool(len(loss)) and bool(np.isfinite(loss.to_numpy(dtype=np.float64)).any())
    if has_loss:
        data["loss_steps"], data["loss"] = loss.index.to_numpy(), loss.to_numpy(dtype=np.float64)
    if len(max_abs):
        data["max_abs"] = max_abs.to_numpy(dtype=np.float64)
    with _style():
        fig = _new_figure(4.4 if has_loss else 2.8)
        axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2]) if has_loss else [fig.add_subplot()]
        ax = axes[0]
        ax.set_title(title or "Global gradient norm")
        if norm.empty:
            _no_data(fig, ax, "no global norm recorded")
        else:
            zeros = _plot_log(
                ax, data["steps"], data["global_grad_l2"], color=RUN_COLORS[0], label=metric_label("global_grad_l2")
            )
            if "max_abs" in data:
                zeros |= _plot_log(
                    ax,
                    max_abs.index.to_numpy(),
                    data["max_abs"],
                    color=RUN_COLORS[2],
                    label=metric_label("grad_max_abs"),
                )
            if clip_value is not None:
                what = "clip value (per element)" if clip_algorithm == "value" else "clip norm"
                ax.axhline(
                    clip_value, color=RUN_COLORS[1], linestyle="--", linewidth=1.1, label=f"{what} {clip_value:g}"
                )
            _log_axis(ax)
            ax.grid(True, axis="y", which="major")
            ax.set_ylabel("gradient norm (log scale)")
            _legend(ax, zeros, loc="best")  # one line alone needs no legend: the axis says what it is
        if has_loss:
            data["loss_log_scale"] = _loss_panel(axes[1], data["loss_steps"], data["loss"])
        _step_axis(axes[-1])
    caption = "Norm of the whole gradient before clipping"
    caption += (
        f", with the clip threshold ({clip_value:g}): above the line, clipping rescales the step."
        if clip_value is not None
        else "."
    )
    if has_loss:
        caption += " Below: the training loss of the recorded steps"
        caption += " (log scale)." if data["loss_log_scale"] else "."
    return FigureResult(fig, data, "global_norm", title or "Global gradient norm", caption)


def _loss_panel(ax: Axes, steps: np.ndarray, loss: np.ndarray) -> bool:
    """The loss over the steps: log scale when every finite value is positive. Returns whether it is log."""
    finite = loss[np.isfinite(loss)]
    log = bool(finite.size) and bool((finite > 0).all())
    ax.plot(steps, loss, color="#444444", linewidth=1.1)
    if log:
        _log_axis(ax)
    ax.set_ylabel("loss (log scale)" if log else "loss")
    ax.grid(True, axis="y", which="major")
    return log


# ---------------------------------------------------------------------------------------- per layer
def update_ratio_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult | None:
    """Update-to-parameter ratio per layer: median over the steps, 10-90 % band, last step; ``None`` if absent.

    The shaded band is the rule of thumb (about ``1e-3`` per step, half a decade either side): far below,
    the layer hardly moves; far above, the learning rate is likely too high for it.

    A layer that did not move at all (a ratio of exactly 0: frozen, or no gradient) counts in the statistics
    with its zeros, and a median or last value of 0 is a marker on the bottom edge of the log axis.

    Returns:
        The figure; ``data["median"]``, ``data["p10"]``, ``data["p90"]``, ``data["last"]`` per layer (over the
        finite values), with ``data["layers"]``. ``None`` when the history holds no finite ``update_ratio``.

    Example:
        >>> result = update_ratio_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    grid = layer_grid(frame, "update_ratio")
    values = np.where(np.isfinite(grid.values), grid.values, np.nan)
    if grid.empty or not np.isfinite(values).any():
        return None
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        median = np.nanmedian(values, axis=1)
        p10 = np.nanpercentile(values, 10, axis=1)
        p90 = np.nanpercentile(values, 90, axis=1)
    last = values[:, -1]
    data: dict[str, Any] = {"median": median, "p10": p10, "p90": p90, "last": last, "layers": list(grid.layers)}
    with _style():
        fig = _new_figure(3.4)
        ax = fig.add_subplot()
        ax.set_title(title or "Update-to-parameter ratio per layer")
        x = np.arange(len(grid.layers))
        ax.axhspan(*UPDATE_RATIO_BAND, color="#bfe3c8", alpha=0.6, linewidth=0, label="rule of thumb ~1e-3")
        ax.axhline(UPDATE_RATIO_TARGET, color="#3a9a55", linestyle="--", linewidth=0.9)
        # A 10th percentile of 0 takes the band down to the bottom edge (a log axis clips it there).
        ax.fill_between(x, p10, p90, color=RUN_COLORS[0], alpha=0.18, linewidth=0, label="10-90 % of steps")
        few = len(grid.layers) <= 60
        zeros = _plot_log(
            ax,
            x,
            median,
            color=RUN_COLORS[0],
            marker="o" if few else None,
            markersize=3,
            label="median over steps",
            dodge=_dodge(0, 2),
        )
        zeros |= _plot_log(
            ax,
            x,
            last,
            dodge=_dodge(1, 2),
            linestyle="none",
            marker="x",
            color=RUN_COLORS[1],
            markersize=4.5 if few else 2.5,
            label=f"step {int(grid.steps[-1])}",
        )
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _depth_axis(ax, grid.layers)
        ax.set_ylabel("|Δθ| / |θ| per step (log scale)")
        _legend(ax, zeros, loc="best", ncol=2)
        _rotate_if_crowded(fig, ax)
    caption = (
        "How far each layer's parameters move per step relative to their size. The green band marks the "
        "usual rule of thumb (about 1e-3); layers far below it barely learn, far above it may be unstable. "
        "Triangles on the bottom edge are a median or last value of exactly zero: the layer did not move."
    )
    return FigureResult(fig, data, "update_ratio", title or "Update-to-parameter ratio per layer", caption)


@contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def activation_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult | None:
    """Activation saturation and dead units per site (mean over steps, min-max band, last step).

    Returns:
        The figure, or ``None`` if the history holds no finite ``act_saturation`` / ``act_dead``.
        ``data["sites"]`` and, per metric shown, ``data[metric]`` as a ``(sites, steps)`` array.

    Example:
        >>> result = activation_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    sites = activation_sites(frame)
    if not sites:
        return None
    panels: list[tuple[str, str]] = []
    data: dict[str, Any] = {"sites": sites}
    for metric, label in (("act_saturation", "saturated outputs"), ("act_dead", "dead units")):
        grid = layer_grid(frame, metric, layers=sites)
        if np.isfinite(grid.values).any():
            panels.append((metric, label))
            data[metric] = grid.values
            data["steps"] = grid.steps
    if not panels:
        return None
    with _style():
        fig = _new_figure(1.0 + 2.0 * len(panels) + (0.6 if len(sites) <= 24 else 0.0))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        axes[0].set_title(title or "Activations per site")
        x = np.arange(len(sites))
        for ax, (metric, label) in zip(axes, panels):
            values = data[metric] * 100.0
            with _quiet_nan_warnings():
                mean = np.nanmean(values, axis=1)
                low, high = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
            # Only the sites this metric applies to (e.g. ReLUs for dead units); separate sites, so no lines.
            keep = np.isfinite(mean)
            few = keep.sum() <= 60
            mean_handle = ax.errorbar(
                x[keep],
                mean[keep],
                yerr=np.clip(np.vstack([mean[keep] - low[keep], high[keep] - mean[keep]]), 0.0, None),  # rounding
                fmt="o",
                markersize=4 if few else 2,
                color=RUN_COLORS[0],
                ecolor="#7fb2d6",
                elinewidth=1.2,
                capsize=2.5 if few else 0,
                label="mean over steps (bar: min to max)",
            )
            (last_handle,) = ax.plot(
                x[keep],
                values[keep, -1],
                linestyle="none",
                marker="x",
                markersize=4.5 if few else 2.5,
                color=RUN_COLORS[1],
                label=f"step {int(data['steps'][-1])}",
                zorder=3,
            )
            ax.set_ylabel(f"{label} (%)")
            ax.set_ylim(-2, 102)
            ax.grid(True, axis="y")
        axes[0].legend(
            handles=[mean_handle, last_handle], loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, borderaxespad=0.2
        )
        axes[0].set_title(axes[0].get_title(), loc="left")
        axes[0].set_title("", loc="center")
        _depth_axis(axes[-1], sites)
        axes[-1].set_xlabel("activation site (forward order)")
        _rotate_if_crowded(fig, axes[-1])
    caption = (
        "Share of activation outputs in the flat region of a saturating non-linearity, and share of "
        "ReLU-family units that never fired on a recorded step's batch, per activation site: the mean over "
        "the recorded steps with a bar from the smallest to the largest, and the last step."
    )
    return FigureResult(fig, data, "activations", title or "Activations per site", caption)


# ------------------------------------------------------------------------------------ backward signal
#: Views of the signal heat map: the L2 norm of dL/dy per block, or its RMS per element.
SIGNAL_VIEWS = ("l2", "rms")


def _signal_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The history's ``signal_*`` rows (empty when the run did not tap the backward signal)."""
    return frame[frame["metric"].str.startswith("signal_") & (frame["layer"] != GLOBAL_LAYER)]


def _signal_rms_rows(signal: pd.DataFrame) -> pd.DataFrame:
    """``signal_rms`` rows: ``signal_l2 / sqrt(signal_elements)`` per block and step."""
    keys = ["step", "layer"]
    l2 = signal[signal["metric"] == "signal_l2"].drop_duplicates(keys, keep="last")
    elements = signal[signal["metric"] == "signal_elements"].drop_duplicates(keys, keep="last")
    merged = l2.merge(elements[[*keys, "value"]], on=keys, suffixes=("", "_elements"), how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        merged["value"] = merged["value"] / np.sqrt(merged["value_elements"].to_numpy(dtype=np.float64))
    merged["metric"] = "signal_rms"
    return merged[list(signal.columns)]


def _block_label(name: str, calls: float) -> str:
    """A block's name, with `` (calls k)`` when it is called ``k > 1`` times per forward pass (its calls summed)."""
    return f"{name} (calls {int(calls)})" if math.isfinite(calls) and calls > 1 else name


def signal_heatmap_figure(
    frame: pd.DataFrame,
    findings: Iterable[Mapping[str, Any] | Any] = (),
    *,
    view: str = "l2",
    title: str | None = None,
) -> FigureResult | None:
    """Heat map of the backward signal: blocks in forward order (input at the top) by optimizer step.

    The signal of a block is the gradient of the loss with respect to its output
    (:mod:`gradlight.signal`); with the default blocks (the layer grouping) its rows line up with those of
    the parameter heat map (:func:`heatmap_figure`), parameter-free blocks included when tapped.

    Args:
        frame: A history in long format.
        findings: Findings to mark, as for :func:`heatmap_figure`.
        view: ``"l2"`` (the norm, what the gains are ratios of) or ``"rms"`` (per element:
            ``signal_l2 / sqrt(signal_elements)``, which compares blocks of different output sizes).
        title: Figure title.

    Returns:
        The figure and the data of :func:`heatmap_figure` (``data["log10"]``, ``data["layers"]`` = the blocks,
        ``data["steps"]``) plus ``data["view"]``; ``None`` when the history holds no backward signal.

    Raises:
        ValueError: For an unknown ``view``.

    Example:
        >>> result = signal_heatmap_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    if view not in SIGNAL_VIEWS:
        raise ValueError(f"`view` must be one of {SIGNAL_VIEWS}, got {view!r}.")
    signal = _signal_frame(frame)
    if not (signal["metric"] == "signal_l2").any():
        return None
    metric = "signal_l2" if view == "l2" else "signal_rms"
    rows = signal if view == "l2" else _signal_rms_rows(signal)
    shown_title = title or ("Backward signal per block and step" + (" (RMS per element)" if view == "rms" else ""))
    result = heatmap_figure(rows, findings, metric=metric, title=shown_title)
    result.figure.axes[0].set_ylabel("block (forward order, input at top)")
    result.data["view"] = view
    result.name = "signal_heatmap"
    result.caption = (
        "Each row is a tapped block (input at the top), each column a recorded step; colour is the norm of "
        "the gradient of the loss with respect to the block's output, on a log scale"
        + (", per element" if view == "rms" else "")
        + ". Where the colour drops from one row to the row above, that block attenuates the signal on its "
        "way back to the input."
    )
    return result


def gain_profile_data(frame: pd.DataFrame, step: int | None = None) -> dict[str, Any] | None:
    """What :func:`gain_profile_figure` draws, without drawing it (``None`` without a backward signal).

    Raises:
        ValueError: If ``step`` is not a recorded step.

    Example:
        >>> data = gain_profile_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> dict(zip(data["blocks"], data["gain"]))  # doctest: +SKIP
    """
    signal = _signal_frame(frame)
    out = layer_grid(signal, "signal_l2")
    if out.empty:
        return None
    blocks = list(out.layers)
    inputs = layer_grid(signal, "signal_in_l2", layers=blocks)
    gains = layer_grid(signal, "signal_gain", layers=blocks)
    calls = layer_grid(signal, "signal_calls", layers=blocks)
    chosen = int(out.steps[-1]) if step is None else int(step)
    if chosen not in set(out.steps.tolist()):
        raise ValueError(f"`step` {chosen} is not a recorded step of the backward signal ({out.steps[:5].tolist()}...)")
    column = int(np.searchsorted(out.steps, chosen))
    at = {name: grid.values[:, column] for name, grid in (("out", out), ("in", inputs), ("gain", gains))}
    with _quiet_nan_warnings():
        median = np.nanmedian(np.where(np.isfinite(gains.values), gains.values, np.nan), axis=1)
        count = np.nanmax(calls.values, axis=1) if calls.values.size else np.ones(len(blocks))
    last_out = at["out"][-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        to_input = np.log10(at["in"]) - np.log10(last_out)
    data: dict[str, Any] = {
        "blocks": blocks,
        "step": chosen,
        "signal_l2": at["out"],
        "signal_in_l2": at["in"],
        "gain": at["gain"],
        "gain_median": median,
        "calls": count,
        "decades_to_input": to_input,
    }
    return data


def gain_profile_figure(
    frame: pd.DataFrame, step: int | None = None, *, title: str | None = None
) -> FigureResult | None:
    """Where along the network the backward signal is lost: the signal per block, and each block's gain.

    Top: the signal at each block's output (circles) and input (triangles, joined to the block's circle)
    at ``step``, on a log axis: read from the right (the loss) to the left (the input), every drop inside a
    block is its gain, every drop between two blocks happens in untapped modules between them. Bottom: each
    block's gain in decades, ``log10(input signal / output signal)``, at ``step`` (bars) and its median over
    the recorded steps (ticks). A shared block (called ``k`` times per forward pass) is labelled ``(calls k)``.

    Args:
        frame: A history in long format.
        step: The step to draw (default: the last recorded).
        title: Figure title.

    Returns:
        The figure, or ``None`` when the history holds no backward signal. ``data["blocks"]``,
        ``data["step"]``, ``data["signal_l2"]``, ``data["signal_in_l2"]``, ``data["gain"]`` (at ``step``),
        ``data["gain_median"]`` (over the steps), ``data["calls"]``, and ``data["decades_to_input"]``: for each
        block, ``log10`` of its input signal over the last block's output signal (how many decades the
        signal has lost by the time it reaches that block's input, gaps between blocks included).

    Raises:
        ValueError: If ``step`` is not a recorded step.

    Example:
        >>> result = gain_profile_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
        >>> result.data["gain"]  # doctest: +SKIP
    """
    data = gain_profile_data(frame, step)
    if data is None:
        return None
    blocks, chosen, count, median = data["blocks"], data["step"], data["calls"], data["gain_median"]
    at = {"out": data["signal_l2"], "in": data["signal_in_l2"], "gain": data["gain"]}
    labels = [_block_label(name, float(c)) for name, c in zip(blocks, count)]
    x = np.arange(len(blocks), dtype=np.float64)
    with _style():
        fig = _new_figure(5.4)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        top.set_title(title or f"Backward signal and gain per block (step {chosen})")
        zeros = _plot_log(top, x, at["out"], color=RUN_COLORS[0], marker="o", label="at the block's output")
        offset = 0.3
        has_input = np.isfinite(at["in"]) & (at["in"] > 0)
        top.plot(
            x[has_input] - offset,
            at["in"][has_input],
            linestyle="none",
            marker="<",
            color=RUN_COLORS[1],
            label="at the block's input",
        )
        for i in np.flatnonzero(has_input & np.isfinite(at["out"]) & (at["out"] > 0)):
            top.plot([x[i] - offset, x[i]], [at["in"][i], at["out"][i]], color=RUN_COLORS[1], linewidth=0.9)
        _log_axis(top)
        top.grid(True, axis="y", which="major")
        top.set_ylabel("|dL/d(activation)| (log scale)")
        _legend(top, zeros, minimum=1, loc="best")
        finite = np.isfinite(at["gain"])
        for which, color, what in (
            (at["gain"] < 0, RUN_COLORS[1], "attenuates"),
            (at["gain"] >= 0, RUN_COLORS[0], "amplifies"),
        ):
            keep_bar = finite & which
            if keep_bar.any():
                bottom.bar(x[keep_bar], at["gain"][keep_bar], color=color, width=0.6, label=f"step {chosen}: {what}")
        keep = np.isfinite(median)
        bottom.plot(x[keep], median[keep], linestyle="none", marker="_", markersize=12, color="#222222", label="median")
        bottom.axhline(0.0, color="#888888", linewidth=0.8)
        bottom.set_ylabel("gain (decades)")
        bottom.grid(True, axis="y")
        bottom.legend(loc="best", ncol=3)
        _depth_axis(bottom, labels)
        bottom.set_xlabel(bottom.get_xlabel().replace("layer", "block"))
        _rotate_if_crowded(fig, bottom)
    caption = (
        "Top: norm of the gradient of the loss with respect to each block's output (circles) and input "
        "(triangles); read from right to left, as the gradient travels. Bottom: each block's gain, "
        "log10(input signal / output signal): -1 means the block passes a tenth of the signal back. The input "
        "signal is the whole gradient of the input tensor, so a shortcut or concatenation that also uses it "
        "counts; the first block has none when the data needs no gradient."
    )
    return FigureResult(fig, data, "gain_profile", title or "Backward signal and gain per block", caption)


# ------------------------------------------------------------------------------------------ comparison
def _relative_depth(count: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(count)


def compare_profiles_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult:
    """Gradient-flow profiles of several runs on one axis: last step solid, first step dotted.

    When the runs have different numbers of layers, depth is shown relative (0 = first layer, 1 = last).

    Returns:
        The figure; per run label ``data[label] = {"x", "first", "last", "first_step", "last_step"}``.

    Example:
        >>> result = compare_profiles_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    grids = [layer_grid(run.frame) for run in runs]
    counts = {len(grid.layers) for grid in grids}
    relative = len(counts) > 1
    data: dict[str, Any] = {"relative_depth": relative}
    with _style():
        fig = _new_figure(3.6)
        ax = fig.add_subplot()
        ax.set_title(title or "Gradient-flow profiles")
        zeros = False
        for i, (run, grid) in enumerate(zip(runs, grids)):
            style = run_style(i)
            dodge = _dodge(i, len(runs), spacing=min(4.5, 36.0 / max(1, len(runs))))
            if grid.empty:
                continue
            x = _relative_depth(len(grid.layers)) if relative else np.arange(len(grid.layers), dtype=np.float64)
            first, last = grid.values[:, 0], grid.values[:, -1]
            data[run.label] = {
                "x": x,
                "first": first,
                "last": last,
                "first_step": int(grid.steps[0]),
                "last_step": int(grid.steps[-1]),
            }
            zeros |= _plot_log(
                ax,
                x,
                last,
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"] if len(x) <= 24 or len(runs) > len(RUN_COLORS) else None,
                markevery=1 if len(x) <= 24 else max(1, len(x) // 8),
                label=f"{run.label} (step {int(grid.steps[-1])})",
                dodge=dodge,
            )
            if len(grid.steps) > 1:
                zeros |= _plot_log(
                    ax, x, first, color=style["color"], linestyle=":", linewidth=1.0, alpha=0.8, dodge=dodge
                )
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        if relative:
            ax.set_xlabel("relative depth (0 = first layer, 1 = last layer)")
        elif grids and grids[0].layers:
            _depth_axis(ax, grids[0].layers)
        ax.set_ylabel(f"{metric_label('grad_l2')} (log scale)")
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="#555555", linestyle=":", linewidth=1.0))
        labels.append("first recorded step")
        if zeros:
            handles.append(_zero_handle())
            labels.append(ZERO_LABEL)
        _legend_right(ax, handles, labels)
        _rotate_if_crowded(fig, ax)
    caption = (
        "Each run's layer gradient norms at its last recorded step (bold line) and first step (thin dotted "
        "line). Steeper lines mean stronger vanishing (rising) or exploding (falling) toward the input."
    )
    return FigureResult(fig, data, "compare_profiles", title or "Gradient-flow profiles", caption)


def compare_ratios_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult:
    """Early-to-late gradient ratio of several runs over the steps, one colour per run.

    Returns:
        The figure; per run label ``data[label] = {"steps", "ratio"}``.

    Example:
        >>> result = compare_ratios_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    data: dict[str, Any] = {}
    with _style():
        fig = _new_figure(3.0)
        ax = fig.add_subplot()
        ax.set_title(title or "Early-to-late gradient ratio")
        zeros = False
        many = len(runs) > len(RUN_COLORS)  # colours repeat: line style and markers tell the runs apart
        for i, run in enumerate(runs):
            series = early_late_series(run.frame)
            data[run.label] = {"steps": series.index.to_numpy(), "ratio": series.to_numpy(dtype=np.float64)}
            style = run_style(i)
            zeros |= _plot_log(
                ax,
                data[run.label]["steps"],
                data[run.label]["ratio"],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"] if many else None,
                markevery=max(1, len(series) // 10),
                label=run.label,
            )
        _balanced_line(ax)
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _step_axis(ax)
        ax.set_ylabel(RATIO_AXIS_LABEL)
        handles, labels = ax.get_legend_handles_labels()
        if zeros:
            handles.append(_zero_handle())
            labels.append(ZERO_LABEL)
        _legend_right(ax, handles, labels)
    caption = "Early-to-late gradient ratio of every run; the dotted line is 1 (balanced flow)."
    return FigureResult(fig, data, "compare_ratios", title or "Early-to-late gradient ratio", caption)


def compare_gains_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult | None:
    """Each run's block gains at its last recorded step, one colour per run; ``None`` if no run has them.

    When the runs tapped different numbers of blocks, depth is shown relative (0 = first block, 1 = last).

    Returns:
        The figure; per run label with a backward signal ``data[label] = {"x", "blocks", "gain", "step",
        "decades_to_input"}``.

    Example:
        >>> result = compare_gains_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    profiles = [(run, gain_profile_data(run.frame)) for run in runs]
    present = [(run, profile) for run, profile in profiles if profile is not None]
    if not present:
        return None
    counts = {len(profile["blocks"]) for _, profile in present}
    relative = len(counts) > 1
    data: dict[str, Any] = {"relative_depth": relative}
    with _style():
        fig = _new_figure(3.6)
        ax = fig.add_subplot()
        ax.set_title(title or "Block gains")
        for i, (run, profile) in enumerate(present):
            style = run_style(i)
            count = len(profile["blocks"])
            x = _relative_depth(count) if relative else np.arange(count, dtype=np.float64)
            data[run.label] = {"x": x, **{key: profile[key] for key in ("blocks", "gain", "step", "decades_to_input")}}
            ax.plot(
                x,
                profile["gain"],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"] if count <= 30 else None,
                label=f"{run.label} (step {profile['step']})",
            )
        ax.axhline(0.0, color="#888888", linewidth=0.8)
        ax.grid(True, axis="y")
        ax.set_ylabel("gain (decades)")
        if relative:
            ax.set_xlabel("relative depth (0 = first block, 1 = last block)")
        else:
            _depth_axis(ax, present[0][1]["blocks"])
            ax.set_xlabel(ax.get_xlabel().replace("layer", "block"))
        _legend_right(ax)
        _rotate_if_crowded(fig, ax)
    caption = (
        "Gain of every tapped block, log10(input signal / output signal), at each run's last recorded step: "
        "below 0 the block attenuates the backward signal. Runs of one architecture share the blocks, so the "
        "block where an ablation loses the signal stands out."
    )
    return FigureResult(fig, data, "compare_gains", title or "Block gains", caption)


def figure_builders(run: Run) -> list[Callable[[], FigureResult | None]]:
    """The figures of one run as zero-argument callables, in report order (a callable may return ``None``).

    Lets a caller draw one figure at a time (and show progress) without holding them all in memory. The
    backward-signal figures (beside the parameter heat map and profile) are there only when the run tapped
    the signal (``signal_*`` rows in the history).
    """
    signal: list[Callable[[], FigureResult | None]] = []
    if (run.frame["metric"] == "signal_l2").any():
        signal = [lambda: signal_heatmap_figure(run.frame, run.findings), lambda: gain_profile_figure(run.frame)]
    return [
        lambda: heatmap_figure(run.frame, run.findings),
        lambda: profile_figure(run.frame, sizes=layer_sizes(run.info)),
        *signal,
        lambda: ratio_figure(run.frame),
        lambda: global_norm_figure(run.frame, run.clip_value, run.clip_algorithm),
        lambda: update_ratio_figure(run.frame),
        lambda: activation_figure(run.frame),
    ]


def layer_sizes(info: Mapping[str, Any]) -> dict[str, int] | None:
    """``layer -> number of parameter elements`` from ``run.json``'s ``layers``, or ``None`` if absent.

    Example:
        >>> layer_sizes({"layers": [{"name": "net.0", "depth": 0, "num_params": 40}]})
        {'net.0': 40}
    """
    layers = info.get("layers")
    if not isinstance(layers, list):
        return None
    sizes = {
        str(layer["name"]): int(layer["num_params"])
        for layer in layers
        if isinstance(layer, Mapping) and "name" in layer and isinstance(layer.get("num_params"), int)
    }
    return sizes or None


def run_figures(run: Run) -> list[FigureResult]:
    """Every figure of one run, in report order (figures without data are left out).

    Example:
        >>> [result.name for result in run_figures(load_run("runs/exp1/gradlight"))]  # doctest: +SKIP
        ['heatmap', 'profile', 'ratio', 'global_norm', 'update_ratio']
    """
    return [result for build in figure_builders(run) if (result := build()) is not None]
