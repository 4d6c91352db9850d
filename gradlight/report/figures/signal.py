"""Figures of the backward signal (``signal_*`` rows): its heat map per block and the gain profile."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradlight.records import GLOBAL_LAYER
from gradlight.report.figures._common import (
    RUN_COLORS,
    FigureResult,
    _depth_axis,
    _legend,
    _log_axis,
    _new_figure,
    _plot_log,
    _quiet_nan_warnings,
    _rotate_if_crowded,
    _style,
)
from gradlight.report.figures.heatmap import draw_heatmap, heatmap_data
from gradlight.report.summary import layer_grid

__all__ = ["SIGNAL_VIEWS", "gain_profile_data", "gain_profile_figure", "signal_heatmap_data", "signal_heatmap_figure"]

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


def signal_heatmap_data(
    frame: pd.DataFrame, findings: Iterable[Mapping[str, Any] | Any] = (), *, view: str = "l2"
) -> dict[str, Any] | None:
    """What :func:`signal_heatmap_figure` draws: :func:`heatmap_data` of the signal rows, plus ``view``.

    Returns ``None`` when the history holds no backward signal.

    Raises:
        ValueError: For an unknown ``view``.

    Example:
        >>> data = signal_heatmap_data(load_history("runs/exp1/gradlight"), view="rms")  # doctest: +SKIP
    """
    if view not in SIGNAL_VIEWS:
        raise ValueError(f"`view` must be one of {SIGNAL_VIEWS}, got {view!r}.")
    signal = _signal_frame(frame)
    if not (signal["metric"] == "signal_l2").any():
        return None
    metric = "signal_l2" if view == "l2" else "signal_rms"
    rows = signal if view == "l2" else _signal_rms_rows(signal)
    data = heatmap_data(rows, findings, metric=metric)
    data["view"] = view
    return data


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
    the parameter heat map (:func:`~gradlight.report.figures.heatmap_figure`), parameter-free blocks included
    when tapped.

    Args:
        frame: A history in long format.
        findings: Findings to mark, as for the parameter heat map.
        view: ``"l2"`` (the norm, what the gains are ratios of) or ``"rms"`` (per element:
            ``signal_l2 / sqrt(signal_elements)``, which compares blocks of different output sizes).
        title: Figure title.

    Returns:
        The figure with the arrays of :func:`signal_heatmap_data` (``data["log10"]``, ``data["layers"]`` = the
        blocks, ``data["steps"]``, ``data["view"]``); ``None`` when the history holds no backward signal.

    Raises:
        ValueError: For an unknown ``view``.

    Example:
        >>> result = signal_heatmap_figure(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    """
    data = signal_heatmap_data(frame, findings, view=view)
    if data is None:
        return None
    shown_title = title or ("Backward signal per block and step" + (" (RMS per element)" if view == "rms" else ""))
    fig = draw_heatmap(data, shown_title)
    fig.axes[0].set_ylabel("block (forward order, input at top)")
    caption = (
        "Each row is a tapped block (input at the top), each column a recorded step; colour is the norm of "
        "the gradient of the loss with respect to the block's output, on a log scale"
        + (", per element" if view == "rms" else "")
        + ". Where the colour drops from one row to the row above, that block attenuates the signal on its "
        "way back to the input."
    )
    return FigureResult(fig, data, "signal_heatmap", shown_title, caption)


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
    data = gain_profile_data(frame, step)
    if data is None:
        return None
    shown_title = title or f"Backward signal and gain per block (step {data['step']})"
    caption = (
        "Top: norm of the gradient of the loss with respect to each block's output (circles) and input "
        "(triangles); read from right to left, as the gradient travels. Bottom: each block's gain, "
        "log10(input signal / output signal): -1 means the block passes a tenth of the signal back. The input "
        "signal is the whole gradient of the input tensor, so a shortcut or concatenation that also uses it "
        "counts; the first block has none when the data needs no gradient."
    )
    fig = draw_gain_profile(data, shown_title)
    return FigureResult(fig, data, "gain_profile", title or "Backward signal and gain per block", caption)


def draw_gain_profile(data: dict[str, Any], title: str) -> Figure:
    """Draw the arrays of :func:`gain_profile_data`: the signal per block above, the gains below."""
    x = np.arange(len(data["blocks"]), dtype=np.float64)
    with _style():
        fig = _new_figure(5.4)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        top.set_title(title)
        _signal_panel(top, x, data["signal_l2"], data["signal_in_l2"])
        _gain_panel(bottom, x, data)
        labels = [_block_label(name, float(c)) for name, c in zip(data["blocks"], data["calls"])]
        _depth_axis(bottom, labels, noun="block")
        _rotate_if_crowded(fig, bottom)
    return fig


def _signal_panel(top: Any, x: np.ndarray, out: np.ndarray, inputs: np.ndarray) -> None:
    zeros = _plot_log(top, x, out, color=RUN_COLORS[0], marker="o", label="at the block's output")
    offset = 0.3
    has_input = np.isfinite(inputs) & (inputs > 0)
    top.plot(
        x[has_input] - offset,
        inputs[has_input],
        linestyle="none",
        marker="<",
        color=RUN_COLORS[1],
        label="at the block's input",
    )
    for i in np.flatnonzero(has_input & np.isfinite(out) & (out > 0)):
        top.plot([x[i] - offset, x[i]], [inputs[i], out[i]], color=RUN_COLORS[1], linewidth=0.9)
    _log_axis(top)
    top.grid(True, axis="y", which="major")
    top.set_ylabel("|dL/d(activation)| (log scale)")
    _legend(top, zeros, minimum=1, loc="best")


def _gain_panel(bottom: Any, x: np.ndarray, data: dict[str, Any]) -> None:
    gain, median, chosen = data["gain"], data["gain_median"], data["step"]
    finite = np.isfinite(gain)
    for which, color, what in ((gain < 0, RUN_COLORS[1], "attenuates"), (gain >= 0, RUN_COLORS[0], "amplifies")):
        keep_bar = finite & which
        if keep_bar.any():
            bottom.bar(x[keep_bar], gain[keep_bar], color=color, width=0.6, label=f"step {chosen}: {what}")
    keep = np.isfinite(median)
    bottom.plot(x[keep], median[keep], linestyle="none", marker="_", markersize=12, color="#222222", label="median")
    bottom.axhline(0.0, color="#888888", linewidth=0.8)
    bottom.set_ylabel("gain (decades)")
    bottom.grid(True, axis="y")
    bottom.legend(loc="best", ncol=3)
