"""Figures of several runs on one axis: gradient-flow profiles, early-to-late ratios and block gains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradlight.report.figures._common import (
    RATIO_AXIS_LABEL,
    RUN_COLORS,
    ZERO_LABEL,
    FigureResult,
    _balanced_line,
    _depth_axis,
    _dodge,
    _legend_right,
    _log_axis,
    _new_figure,
    _plot_log,
    _point_marker,
    _relative_depth,
    _rotate_if_crowded,
    _step_axis,
    _style,
    _zero_handle,
    metric_label,
    run_style,
)
from gradlight.report.figures.signal import gain_profile_data
from gradlight.report.summary import Run, early_late_series, layer_grid

__all__ = [
    "compare_gains_data",
    "compare_gains_figure",
    "compare_profiles_data",
    "compare_profiles_figure",
    "compare_ratios_data",
    "compare_ratios_figure",
]


def compare_profiles_data(runs: Sequence[Run]) -> dict[str, Any]:
    """What :func:`compare_profiles_figure` draws, without drawing it.

    Returns:
        ``relative_depth`` (whether depth is relative: the runs differ in layer count), ``first_layers``
        (the layer names of the first run with any) and per run label with a gradient norm
        ``data[label] = {"x", "first", "last", "first_step", "last_step"}``.

    Example:
        >>> data = compare_profiles_data([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    grids = [layer_grid(run.frame) for run in runs]
    relative = len({len(grid.layers) for grid in grids}) > 1
    data: dict[str, Any] = {"relative_depth": relative, "first_layers": next((g.layers for g in grids if g.layers), [])}
    for run, grid in zip(runs, grids):
        if grid.empty:
            continue
        x = _relative_depth(len(grid.layers)) if relative else np.arange(len(grid.layers), dtype=np.float64)
        data[run.label] = {
            "x": x,
            "first": grid.values[:, 0],
            "last": grid.values[:, -1],
            "first_step": int(grid.steps[0]),
            "last_step": int(grid.steps[-1]),
        }
    return data


def compare_profiles_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult:
    """Gradient-flow profiles of several runs on one axis: last step solid, first step dotted.

    When the runs have different numbers of layers, depth is shown relative (0 = first layer, 1 = last).

    Returns:
        The figure; per run label ``data[label] = {"x", "first", "last", "first_step", "last_step"}``
        (:func:`compare_profiles_data`).

    Example:
        >>> result = compare_profiles_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    data = compare_profiles_data(runs)
    shown_title = title or "Gradient-flow profiles"
    caption = (
        "Each run's layer gradient norms at its last recorded step (bold line) and first step (thin dotted "
        "line). Steeper lines mean stronger vanishing (rising) or exploding (falling) toward the input."
    )
    fig = draw_compare_profiles(data, [run.label for run in runs], shown_title)
    return FigureResult(fig, data, "compare_profiles", shown_title, caption)


def draw_compare_profiles(data: dict[str, Any], labels: Sequence[str], title: str) -> Figure:
    """Draw the arrays of :func:`compare_profiles_data` for the runs ``labels`` (in their order)."""
    with _style():
        fig = _new_figure(3.6)
        ax = fig.add_subplot()
        ax.set_title(title)
        zeros = False
        for i, label in enumerate(labels):
            if label not in data or not isinstance(data[label], dict):
                continue
            zeros |= _compare_profile_lines(ax, data[label], label, i, len(labels))
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        if data["relative_depth"]:
            ax.set_xlabel("relative depth (0 = first layer, 1 = last layer)")
        elif data["first_layers"]:
            _depth_axis(ax, data["first_layers"])
        ax.set_ylabel(f"{metric_label('grad_l2')} (log scale)")
        handles, names = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="#555555", linestyle=":", linewidth=1.0))
        names.append("first recorded step")
        _legend_right(ax, *_with_zero_handle(handles, names, zeros))
        _rotate_if_crowded(fig, ax)
    return fig


def _compare_profile_lines(ax: Axes, run: dict[str, Any], label: str, index: int, count: int) -> bool:
    style = run_style(index)
    x = run["x"]
    dodge = _dodge(index, count, spacing=min(4.5, 36.0 / max(1, count)))
    zeros = _plot_log(
        ax,
        x,
        run["last"],
        color=style["color"],
        linestyle=style["linestyle"],
        marker=style["marker"] if len(x) <= 24 or count > len(RUN_COLORS) else None,
        markevery=1 if len(x) <= 24 else max(1, len(x) // 8),
        label=f"{label} (step {run['last_step']})",
        dodge=dodge,
    )
    if run["first_step"] != run["last_step"]:
        zeros |= _plot_log(
            ax, x, run["first"], color=style["color"], linestyle=":", linewidth=1.0, alpha=0.8, dodge=dodge
        )
    return zeros


def _with_zero_handle(handles: list[Any], labels: list[str], zeros: bool) -> tuple[list[Any], list[str]]:
    if zeros:
        handles.append(_zero_handle())
        labels.append(ZERO_LABEL)
    return handles, labels


def compare_ratios_data(runs: Sequence[Run]) -> dict[str, Any]:
    """What :func:`compare_ratios_figure` draws: per run label ``data[label] = {"steps", "ratio"}``.

    Example:
        >>> data = compare_ratios_data([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    data: dict[str, Any] = {}
    for run in runs:
        series = early_late_series(run.frame)
        data[run.label] = {"steps": series.index.to_numpy(), "ratio": series.to_numpy(dtype=np.float64)}
    return data


def compare_ratios_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult:
    """Early-to-late gradient ratio of several runs over the steps, one colour per run.

    Returns:
        The figure; per run label ``data[label] = {"steps", "ratio"}`` (:func:`compare_ratios_data`).

    Example:
        >>> result = compare_ratios_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    data = compare_ratios_data(runs)
    shown_title = title or "Early-to-late gradient ratio"
    caption = "Early-to-late gradient ratio of every run; the dotted line is 1 (balanced flow)."
    return FigureResult(draw_compare_ratios(data, shown_title), data, "compare_ratios", shown_title, caption)


def draw_compare_ratios(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`compare_ratios_data`, runs in the order of ``data``."""
    with _style():
        fig = _new_figure(3.0)
        ax = fig.add_subplot()
        ax.set_title(title)
        zeros = False
        many = len(data) > len(RUN_COLORS)  # colours repeat: line style and markers tell the runs apart
        all_steps: list[np.ndarray] = []
        for i, (label, run) in enumerate(data.items()):
            style = run_style(i)
            all_steps.append(run["steps"])
            zeros |= _plot_log(
                ax,
                run["steps"],
                run["ratio"],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"] if many else _point_marker(len(run["steps"]), style["marker"]),
                markevery=max(1, len(run["steps"]) // 10),
                label=label,
            )
        _balanced_line(ax)
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _step_axis(ax, np.concatenate(all_steps) if all_steps else None)
        ax.set_ylabel(RATIO_AXIS_LABEL)
        _legend_right(ax, *_with_zero_handle(*ax.get_legend_handles_labels(), zeros))
    return fig


def compare_gains_data(runs: Sequence[Run]) -> dict[str, Any] | None:
    """What :func:`compare_gains_figure` draws (``None`` when no run has a backward signal).

    Returns:
        ``relative_depth`` and per run label with a backward signal ``data[label] = {"x", "blocks", "gain",
        "step", "decades_to_input"}``.

    Example:
        >>> data = compare_gains_data([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    profiles = [(run, gain_profile_data(run.frame)) for run in runs]
    present = [(run, profile) for run, profile in profiles if profile is not None]
    if not present:
        return None
    relative = len({len(profile["blocks"]) for _, profile in present}) > 1
    data: dict[str, Any] = {"relative_depth": relative}
    for run, profile in present:
        count = len(profile["blocks"])
        x = _relative_depth(count) if relative else np.arange(count, dtype=np.float64)
        data[run.label] = {"x": x, **{key: profile[key] for key in ("blocks", "gain", "step", "decades_to_input")}}
    return data


def compare_gains_figure(runs: Sequence[Run], *, title: str | None = None) -> FigureResult | None:
    """Each run's block gains at its last recorded step, one colour per run; ``None`` if no run has them.

    When the runs tapped different numbers of blocks, depth is shown relative (0 = first block, 1 = last).

    Returns:
        The figure; per run label with a backward signal ``data[label] = {"x", "blocks", "gain", "step",
        "decades_to_input"}`` (:func:`compare_gains_data`).

    Example:
        >>> result = compare_gains_figure([load_run("a"), load_run("b")])  # doctest: +SKIP
    """
    data = compare_gains_data(runs)
    if data is None:
        return None
    shown_title = title or "Block gains"
    caption = (
        "Gain of every tapped block, log10(input signal / output signal), at each run's last recorded step: "
        "below 0 the block attenuates the backward signal. Runs of one architecture share the blocks, so the "
        "block where an ablation loses the signal stands out."
    )
    return FigureResult(draw_compare_gains(data, shown_title), data, "compare_gains", shown_title, caption)


def draw_compare_gains(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`compare_gains_data`, runs in the order of ``data``."""
    runs = {label: run for label, run in data.items() if isinstance(run, dict)}
    with _style():
        fig = _new_figure(3.6)
        ax = fig.add_subplot()
        ax.set_title(title)
        for i, (label, run) in enumerate(runs.items()):
            style = run_style(i)
            ax.plot(
                run["x"],
                run["gain"],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"] if len(run["blocks"]) <= 30 else None,
                label=f"{label} (step {run['step']})",
            )
        ax.axhline(0.0, color="#888888", linewidth=0.8)
        ax.grid(True, axis="y")
        ax.set_ylabel("gain (decades)")
        if data["relative_depth"]:
            ax.set_xlabel("relative depth (0 = first block, 1 = last block)")
        else:
            _depth_axis(ax, next(iter(runs.values()))["blocks"], noun="block")
        _legend_right(ax)
        _rotate_if_crowded(fig, ax)
    return fig
