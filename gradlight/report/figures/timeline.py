"""Figures over the steps: the early-to-late gradient ratio, the global gradient norm and the loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gradlight.report.figures._common import (
    RATIO_AXIS_LABEL,
    RUN_COLORS,
    FigureResult,
    _balanced_line,
    _legend,
    _log_axis,
    _new_figure,
    _no_data,
    _plot_log,
    _point_marker,
    _step_axis,
    _style,
    metric_label,
)
from gradlight.report.summary import early_late_series, global_norm_series, global_series

__all__ = ["global_norm_data", "global_norm_figure", "ratio_data", "ratio_figure"]


def ratio_data(frame: pd.DataFrame) -> dict[str, Any]:
    """What :func:`ratio_figure` draws: ``steps`` and ``ratio`` (first over last layer gradient norm).

    Example:
        >>> data = ratio_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    series = early_late_series(frame)
    return {"steps": series.index.to_numpy(), "ratio": series.to_numpy(dtype=np.float64)}


def ratio_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult:
    """Early-to-late gradient ratio over the steps (log scale, 1 = balanced).

    Returns:
        The figure; ``data["steps"]`` and ``data["ratio"]`` (:func:`ratio_data`).

    Example:
        >>> result = ratio_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    data = ratio_data(frame)
    shown_title = title or "Early-to-late gradient ratio"
    caption = (
        "Gradient norm of the first layer(s) over that of the last layer(s). Far below 1: the input side "
        "receives little gradient (vanishing); far above 1: it receives too much (exploding). Triangles on "
        "the bottom edge are steps where the first layers' gradient was exactly zero."
    )
    return FigureResult(draw_ratio(data, shown_title), data, "ratio", shown_title, caption)


def draw_ratio(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`ratio_data`."""
    with _style():
        fig = _new_figure(2.8)
        ax = fig.add_subplot()
        ax.set_title(title)
        if not len(data["steps"]):
            _no_data(fig, ax, "no early-to-late ratio recorded")
            return fig
        marker = _point_marker(len(data["steps"]))
        zeros = _plot_log(ax, data["steps"], data["ratio"], color=RUN_COLORS[0], marker=marker)
        _balanced_line(ax)
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _step_axis(ax, data["steps"])
        ax.set_ylabel(RATIO_AXIS_LABEL)
        _legend(ax, zeros, minimum=1, loc="best")
    return fig


def global_norm_data(
    frame: pd.DataFrame, clip_value: float | None = None, clip_algorithm: str = "norm"
) -> dict[str, Any]:
    """What :func:`global_norm_figure` draws, without drawing it.

    Returns:
        ``steps``, ``global_grad_l2``, ``clip_value``, ``clip_algorithm``; when recorded ``loss_steps`` and
        ``loss``; with value clipping ``max_abs_steps`` and ``max_abs`` (the largest gradient element).

    Example:
        >>> data = global_norm_data(load_history("runs/exp1/gradlight"), clip_value=1.0)  # doctest: +SKIP
    """
    norm = global_norm_series(frame)
    loss = global_series(frame, "loss")
    max_abs = global_series(frame, "global_grad_max_abs") if clip_algorithm == "value" else pd.Series()
    data: dict[str, Any] = {
        "steps": norm.index.to_numpy(),
        "global_grad_l2": norm.to_numpy(dtype=np.float64),
        "clip_value": clip_value,
        "clip_algorithm": clip_algorithm,
    }
    if len(loss) and np.isfinite(loss.to_numpy(dtype=np.float64)).any():
        data["loss_steps"], data["loss"] = loss.index.to_numpy(), loss.to_numpy(dtype=np.float64)
        finite = data["loss"][np.isfinite(data["loss"])]
        data["loss_log_scale"] = bool((finite > 0).all())
    if len(max_abs):
        data["max_abs_steps"], data["max_abs"] = max_abs.index.to_numpy(), max_abs.to_numpy(dtype=np.float64)
    return data


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
        The figure, with the arrays of :func:`global_norm_data` as ``data``.

    Example:
        >>> result = global_norm_figure(load_history("runs/exp1/gradlight"), clip_value=1.0)  # doctest: +SKIP
    """
    data = global_norm_data(frame, clip_value, clip_algorithm)
    shown_title = title or "Global gradient norm"
    caption = "Norm of the whole gradient before clipping"
    caption += (
        f", with the clip threshold ({clip_value:g}): above the line, clipping rescales the step."
        if clip_value is not None
        else "."
    )
    if "loss" in data:
        caption += " Below: the training loss of the recorded steps"
        caption += " (log scale)." if data["loss_log_scale"] else "."
    return FigureResult(draw_global_norm(data, shown_title), data, "global_norm", shown_title, caption)


def draw_global_norm(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`global_norm_data`: the norm above, the loss (if recorded) below."""
    has_loss = "loss" in data
    with _style():
        fig = _new_figure(4.4 if has_loss else 2.8)
        axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2]) if has_loss else [fig.add_subplot()]
        ax = axes[0]
        ax.set_title(title)
        if not len(data["steps"]):
            _no_data(fig, ax, "no global norm recorded")
        else:
            _norm_panel(ax, data)
        if has_loss:
            _loss_panel(axes[1], data["loss_steps"], data["loss"], data["loss_log_scale"])
        _step_axis(axes[-1], data["steps"] if len(data["steps"]) else data.get("loss_steps"))
    return fig


def _norm_panel(ax: Axes, data: dict[str, Any]) -> None:
    marker = _point_marker(len(data["steps"]))
    label = metric_label("global_grad_l2")
    zeros = _plot_log(ax, data["steps"], data["global_grad_l2"], color=RUN_COLORS[0], marker=marker, label=label)
    if "max_abs" in data:
        zeros |= _plot_log(
            ax,
            data["max_abs_steps"],
            data["max_abs"],
            color=RUN_COLORS[2],
            marker=_point_marker(len(data["max_abs"])),
            label=metric_label("grad_max_abs"),
        )
    clip_value = data["clip_value"]
    if clip_value is not None:
        what = "clip value (per element)" if data["clip_algorithm"] == "value" else "clip norm"
        ax.axhline(clip_value, color=RUN_COLORS[1], linestyle="--", linewidth=1.1, label=f"{what} {clip_value:g}")
    _log_axis(ax)
    ax.grid(True, axis="y", which="major")
    ax.set_ylabel("gradient norm (log scale)")
    _legend(ax, zeros, loc="best")  # one line alone needs no legend: the axis says what it is


def _loss_panel(ax: Axes, steps: np.ndarray, loss: np.ndarray, log: bool) -> None:
    """The loss over the steps: log scale when every finite value is positive."""
    ax.plot(steps, loss, color="#444444", linewidth=1.1, marker=_point_marker(len(steps)))
    if log:
        _log_axis(ax)
    ax.set_ylabel("loss (log scale)" if log else "loss")
    ax.grid(True, axis="y", which="major")
