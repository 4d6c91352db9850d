"""Figures with one point per layer or site: the update-to-parameter ratio and the activation statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradlight.report.figures._common import (
    RUN_COLORS,
    FigureResult,
    _depth_axis,
    _dodge,
    _legend,
    _log_axis,
    _new_figure,
    _plot_log,
    _quiet_nan_warnings,
    _rotate_if_crowded,
    _style,
)
from gradlight.report.summary import activation_sites, layer_grid

__all__ = [
    "UPDATE_RATIO_BAND",
    "UPDATE_RATIO_TARGET",
    "activation_data",
    "activation_figure",
    "update_ratio_data",
    "update_ratio_figure",
]

#: The update-to-parameter ratio rule of thumb: about 1e-3 per step ...
UPDATE_RATIO_TARGET = 1e-3
#: ... within half a decade either side.
UPDATE_RATIO_BAND = (10**-3.5, 10**-2.5)


def update_ratio_data(frame: pd.DataFrame) -> dict[str, Any] | None:
    """What :func:`update_ratio_figure` draws (``None`` when the history holds no finite ``update_ratio``).

    Returns:
        ``median``, ``p10``, ``p90`` (over the steps, finite values) and ``last`` per layer, with ``layers``
        and ``last_step``.

    Example:
        >>> data = update_ratio_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    grid = layer_grid(frame, "update_ratio")
    values = np.where(np.isfinite(grid.values), grid.values, np.nan)
    if grid.empty or not np.isfinite(values).any():
        return None
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        median = np.nanmedian(values, axis=1)
        p10 = np.nanpercentile(values, 10, axis=1)
        p90 = np.nanpercentile(values, 90, axis=1)
    return {
        "median": median,
        "p10": p10,
        "p90": p90,
        "last": values[:, -1],
        "layers": list(grid.layers),
        "last_step": int(grid.steps[-1]),
    }


def update_ratio_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult | None:
    """Update-to-parameter ratio per layer: median over the steps, 10-90 % band, last step; ``None`` if absent.

    The shaded band is the rule of thumb (about ``1e-3`` per step, half a decade either side): far below,
    the layer hardly moves; far above, the learning rate is likely too high for it. The x axis names the
    layers (a name every few layers on a long model).

    A layer that did not move at all (a ratio of exactly 0: frozen, or no gradient) counts in the statistics
    with its zeros, and a median or last value of 0 is a marker on the bottom edge of the log axis.

    Returns:
        The figure with the arrays of :func:`update_ratio_data` as ``data``; ``None`` when the history holds
        no finite ``update_ratio``.

    Example:
        >>> result = update_ratio_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    data = update_ratio_data(frame)
    if data is None:
        return None
    shown_title = title or "Update-to-parameter ratio per layer"
    caption = (
        "How far each layer's parameters move per step relative to their size. The green band marks the "
        "usual rule of thumb (about 1e-3); layers far below it barely learn, far above it may be unstable. "
        "Triangles on the bottom edge are a median or last value of exactly zero: the layer did not move."
    )
    return FigureResult(draw_update_ratio(data, shown_title), data, "update_ratio", shown_title, caption)


def draw_update_ratio(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`update_ratio_data`."""
    layers = data["layers"]
    with _style():
        fig = _new_figure(3.4)
        ax = fig.add_subplot()
        ax.set_title(title)
        x = np.arange(len(layers))
        ax.axhspan(*UPDATE_RATIO_BAND, color="#bfe3c8", alpha=0.6, linewidth=0, label="rule of thumb ~1e-3")
        ax.axhline(UPDATE_RATIO_TARGET, color="#3a9a55", linestyle="--", linewidth=0.9)
        # A 10th percentile of 0 takes the band down to the bottom edge (a log axis clips it there).
        ax.fill_between(
            x, data["p10"], data["p90"], color=RUN_COLORS[0], alpha=0.18, linewidth=0, label="10-90 % of steps"
        )
        few = len(layers) <= 60
        zeros = _plot_log(
            ax,
            x,
            data["median"],
            color=RUN_COLORS[0],
            marker="o" if few else None,
            markersize=3,
            label="median over steps",
            dodge=_dodge(0, 2),
        )
        zeros |= _plot_log(
            ax,
            x,
            data["last"],
            dodge=_dodge(1, 2),
            linestyle="none",
            marker="x",
            color=RUN_COLORS[1],
            markersize=4.5 if few else 2.5,
            label=f"step {data['last_step']}",
        )
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _depth_axis(ax, layers)
        ax.set_ylabel("|Δθ| / |θ| per step (log scale)")
        _legend(ax, zeros, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, borderaxespad=0.2)
        ax.set_title(title, loc="left")
        ax.set_title("", loc="center")
        _rotate_if_crowded(fig, ax)
    return fig


def activation_data(frame: pd.DataFrame) -> dict[str, Any] | None:
    """What :func:`activation_figure` draws (``None`` without finite ``act_saturation`` / ``act_dead``).

    Returns:
        ``sites``, ``steps``, ``metrics`` (those shown) and per metric ``data[metric]``, a ``(sites, steps)``
        array of fractions.

    Example:
        >>> data = activation_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    sites = activation_sites(frame)
    if not sites:
        return None
    data: dict[str, Any] = {"sites": sites, "metrics": []}
    for metric in ("act_saturation", "act_dead"):
        grid = layer_grid(frame, metric, layers=sites)
        if np.isfinite(grid.values).any():
            data["metrics"].append(metric)
            data[metric] = grid.values
            data["steps"] = grid.steps
    return data if data["metrics"] else None


def activation_figure(frame: pd.DataFrame, *, title: str | None = None) -> FigureResult | None:
    """Activation saturation and dead units per site (mean over steps, min-max band, last step).

    Returns:
        The figure, or ``None`` if the history holds no finite ``act_saturation`` / ``act_dead``.
        ``data["sites"]`` and, per metric shown, ``data[metric]`` as a ``(sites, steps)`` array
        (:func:`activation_data`).

    Example:
        >>> result = activation_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    data = activation_data(frame)
    if data is None:
        return None
    shown_title = title or "Activations per site"
    caption = (
        "Share of activation outputs in the flat region of a saturating non-linearity, and share of "
        "ReLU-family units that never fired on a recorded step's batch, per activation site: the mean over "
        "the recorded steps with a bar from the smallest to the largest, and the last step."
    )
    return FigureResult(draw_activations(data, shown_title), data, "activations", shown_title, caption)


_ACTIVATION_LABELS = {"act_saturation": "saturated outputs", "act_dead": "dead units"}


def draw_activations(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`activation_data`: one panel per metric, sites along x."""
    sites, panels = data["sites"], data["metrics"]
    with _style():
        fig = _new_figure(1.0 + 2.0 * len(panels) + (0.6 if len(sites) <= 24 else 0.0))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        x = np.arange(len(sites))
        handles: list[Any] = []
        for ax, metric in zip(axes, panels):
            handles = _activation_panel(ax, x, data[metric] * 100.0, int(data["steps"][-1]))
            ax.set_ylabel(f"{_ACTIVATION_LABELS[metric]} (%)")
        axes[0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, borderaxespad=0.2)
        axes[0].set_title(title, loc="left")
        _depth_axis(axes[-1], sites, noun="activation site")
        _rotate_if_crowded(fig, axes[-1])
    return fig


def _activation_panel(ax: Any, x: np.ndarray, values: np.ndarray, last_step: int) -> list[Any]:
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
        label=f"step {last_step}",
        zorder=3,
    )
    ax.set_ylim(-2, 102)
    ax.grid(True, axis="y")
    return [mean_handle, last_handle]
