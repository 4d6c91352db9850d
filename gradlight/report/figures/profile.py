"""The gradient-flow profile: gradient norm against depth at a few steps, per layer, element or block."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd

from gradlight.report.figures._common import (
    FigureResult,
    _depth_axis,
    _dodge,
    _legend,
    _log_axis,
    _new_figure,
    _no_data,
    _plot_log,
    _rotate_if_crowded,
    _style,
    metric_label,
)
from gradlight.report.summary import SLOPE_UNIT, layer_grid, profile_slope

__all__ = ["PROFILE_VIEWS", "SLOPE_UNIT", "profile_data", "profile_figure", "repeated_block"]


def _profile_steps(steps: np.ndarray, count: int = 3) -> np.ndarray:
    if len(steps) <= count:
        return steps
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(np.int64))
    return steps[picks]


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


def profile_data(
    frame: pd.DataFrame,
    steps: Sequence[int] | None = None,
    *,
    view: str = "auto",
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """What :func:`profile_figure` draws, without drawing it.

    Args:
        frame: A history in long format.
        steps: The steps to draw (default: first, middle and last recorded).
        view: One of :data:`PROFILE_VIEWS`.
        sizes: ``layer -> number of parameter elements`` (``run.json``'s ``layers``), for ``"element"``.

    Returns:
        ``grad_l2`` (``(len(steps), points)`` in the chosen view), ``view``, ``steps``, ``layers`` (the
        points: layers or blocks), ``depths`` and ``slopes``: at each step the least-squares slope of
        ``log10(grad_l2)`` over the layers in :data:`SLOPE_UNIT` (whatever the view: the number the
        summary table gives for the last step).

    Raises:
        ValueError: For an unknown ``view``, steps not in the history, or ``"element"`` without sizes.

    Example:
        >>> data = profile_data(load_history("runs/exp1/gradlight"), view="block")  # doctest: +SKIP
        >>> data["slopes"]  # decades per layer  # doctest: +SKIP
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
    picked = [columns[int(s)] for s in chosen]
    values = np.stack([shown[:, j] for j in picked]) if picked else np.zeros((0, len(points)))
    slopes = np.asarray([profile_slope(grid.depths, grid.values[:, j]) for j in picked], dtype=np.float64)
    return {"grad_l2": values, "view": view, "steps": chosen, "layers": points, "depths": depths, "slopes": slopes}


def profile_figure(
    frame: pd.DataFrame,
    steps: Sequence[int] | None = None,
    *,
    view: str = "auto",
    sizes: Mapping[str, int] | None = None,
    title: str | None = None,
) -> FigureResult:
    """Gradient-flow profile: gradient norm against depth at a few steps (default: first, middle, last).

    On the log axis a vanishing network is a line rising from the input to the output; the legend gives
    each step's slope in decades per layer (:data:`SLOPE_UNIT`, fitted over the layers whatever the view,
    the unit of the report's summary table).

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
        The figure, with the arrays of :func:`profile_data` as ``data``.

    Raises:
        ValueError: For an unknown ``view``, steps not in the history, or ``"element"`` without sizes.

    Example:
        >>> result = profile_figure(load_history("runs/exp1/gradlight"), view="block")  # doctest: +SKIP
        >>> result.data["slopes"]  # doctest: +SKIP
    """
    data = profile_data(frame, steps, view=view, sizes=sizes)
    shown_title = title or "Gradient-flow profile"
    caption = (
        f"{_PROFILE_CAPTION[data['view']]} at the first, middle and last recorded step. A line rising steeply "
        f"from input to output (a positive slope, in {SLOPE_UNIT}, fitted over the layers) means the first "
        "layers barely learn. Triangles on the bottom edge are points whose gradient was exactly zero."
    )
    return FigureResult(draw_profile(data, shown_title), data, "profile", shown_title, caption)


def slope_label(step: int, slope: float) -> str:
    """A profile legend entry, the slope to two significant digits (a flat profile's is not ``-0.00``).

    Example:
        >>> slope_label(40, 0.0324), slope_label(0, -2.21e-05)
        ('step 40 (slope +0.032 decades/layer)', 'step 0 (slope -2.2e-05 decades/layer)')
    """
    label = f"step {int(step)}"
    return label + f" (slope {slope:+.2g} {SLOPE_UNIT})" if math.isfinite(slope) else label


def draw_profile(data: dict[str, Any], title: str) -> Any:
    """Draw the arrays of :func:`profile_data`; the legend sits above the axes, clear of the points."""
    points, chosen, view = data["layers"], data["steps"], data["view"]
    many = len(points) > 24
    with _style():
        fig = _new_figure(3.6 if many else 3.8)
        ax = fig.add_subplot()
        ax.set_title(title, loc="left")
        if not len(chosen):
            _no_data(fig, ax, "no gradient norm recorded")
            return fig
        colors = mpl.colormaps["viridis"](np.linspace(0.85, 0.05, len(chosen)))
        x = np.arange(len(points))
        zeros = False
        for k, (row, step, slope, color) in enumerate(zip(data["grad_l2"], chosen, data["slopes"], colors)):
            marker = "o" if not many or len(points) == 1 else None
            zeros |= _plot_log(
                ax, x, row, marker=marker, color=color, label=slope_label(step, slope), dodge=_dodge(k, len(chosen))
            )
        _log_axis(ax)
        ax.grid(True, axis="y", which="major")
        _depth_axis(ax, points, noun="block" if view == "block" else "layer")
        ax.set_ylabel(_PROFILE_AXIS[view])
        _legend(ax, zeros, minimum=1, loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
        _rotate_if_crowded(fig, ax)
    return fig


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
