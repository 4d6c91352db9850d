"""What every figure shares: the result type, the style, the colours and the drawing helpers.

Each figure family (a module of this package) splits a figure in two: a pure ``*_data()`` function from a
history to the arrays the figure shows (testable without matplotlib), and a ``*_figure()`` function that
calls it and draws them with the helpers here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, MaxNLocator
from matplotlib.transforms import ScaledTranslation

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
    if 0 <= cut < len(tail) - 1:  # start at a name component: "…h.4.mlp.c_fc", not "…sformer.h.4.mlp.c_fc"
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


def _step_axis(ax: Axes, steps: Sequence[int] | np.ndarray | None = None) -> None:
    """Whole-number step ticks; around a single recorded step, one tick on it and a step either side."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel("optimizer step")
    unique = np.unique(np.asarray([] if steps is None else steps, dtype=np.float64))
    if unique.size == 1:
        ax.set_xlim(unique[0] - 1.0, unique[0] + 1.0)
        ax.xaxis.set_major_locator(FixedLocator([float(unique[0])]))


#: Series with at most this many points are drawn with a marker on each point (one point is no line).
FEW_POINTS = 12


def _point_marker(count: int, marker: str = "o") -> str | None:
    """A marker for a short series (so one or two recorded steps show), none for a long one."""
    return marker if count <= FEW_POINTS else None


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


@contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _depth_axis(ax: Axes, layers: Sequence[str], max_names: int = 24, noun: str = "layer") -> None:
    """Layer names as x tick labels, every k-th one past ``max_names`` (call :func:`_rotate_if_crowded` after).

    A long model keeps names, not depth numbers: ``max_names`` evenly spaced ones, shortened to their end.
    ``noun`` names what a point is in the axis label (``layer``, ``block``, ``activation site``).
    """
    positions = _thin(len(layers), max_names)
    ax.xaxis.set_major_locator(FixedLocator(positions.astype(np.float64).tolist()))
    ax.set_xticklabels([shorten_label(layers[i], 20) for i in positions])
    every = f"; a name every {int(positions[1] - positions[0])} {noun}s" if len(positions) < len(layers) else ""
    ax.set_xlabel(f"{noun} (forward order{every})")
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


def _relative_depth(count: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(count)
