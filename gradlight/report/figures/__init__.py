"""How a report shows a run: pure functions from a history DataFrame to arrays, and from arrays to a Figure.

One module per figure family: :mod:`~gradlight.report.figures.heatmap` (layers by steps),
:mod:`~gradlight.report.figures.profile` (gradient norm against depth),
:mod:`~gradlight.report.figures.timeline` (early-to-late ratio, global norm and loss over the steps),
:mod:`~gradlight.report.figures.per_layer` (update ratio, activations),
:mod:`~gradlight.report.figures.signal` (backward signal) and :mod:`~gradlight.report.figures.compare`
(several runs). Each figure is a pure ``*_data()`` function (the arrays it shows: test them without
drawing) and a ``*_figure()`` function returning a :class:`FigureResult`: the figure, the same arrays, a
short name for file names and a caption. Figures are built with :class:`matplotlib.figure.Figure` directly
(no pyplot state, no GUI backend), sized for a paper column (7 inches wide) and saved by the caller.

Example:
    >>> from gradlight.report.figures import profile_data
    >>> data = profile_data(load_history("runs/exp1/gradlight"))  # doctest: +SKIP
    >>> data["slopes"]  # decades per layer at the first, middle and last step  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gradlight.report.figures._common import (
    METRIC_LABELS,
    RUN_COLORS,
    FigureResult,
    metric_label,
    run_style,
    shorten_label,
)
from gradlight.report.figures.compare import (
    compare_gains_data,
    compare_gains_figure,
    compare_profiles_data,
    compare_profiles_figure,
    compare_ratios_data,
    compare_ratios_figure,
)
from gradlight.report.figures.heatmap import FINDING_MARKERS, heatmap_data, heatmap_figure
from gradlight.report.figures.per_layer import (
    UPDATE_RATIO_BAND,
    UPDATE_RATIO_TARGET,
    activation_data,
    activation_figure,
    update_ratio_data,
    update_ratio_figure,
)
from gradlight.report.figures.profile import PROFILE_VIEWS, profile_data, profile_figure, repeated_block
from gradlight.report.figures.signal import (
    SIGNAL_VIEWS,
    gain_profile_data,
    gain_profile_figure,
    signal_heatmap_data,
    signal_heatmap_figure,
)
from gradlight.report.figures.timeline import global_norm_data, global_norm_figure, ratio_data, ratio_figure
from gradlight.report.summary import Run

__all__ = [
    "FINDING_MARKERS",
    "METRIC_LABELS",
    "PROFILE_VIEWS",
    "RUN_COLORS",
    "SIGNAL_VIEWS",
    "UPDATE_RATIO_BAND",
    "UPDATE_RATIO_TARGET",
    "FigureResult",
    "activation_data",
    "activation_figure",
    "compare_gains_data",
    "compare_gains_figure",
    "compare_profiles_data",
    "compare_profiles_figure",
    "compare_ratios_data",
    "compare_ratios_figure",
    "figure_builders",
    "gain_profile_data",
    "gain_profile_figure",
    "global_norm_data",
    "global_norm_figure",
    "heatmap_data",
    "heatmap_figure",
    "layer_sizes",
    "metric_label",
    "profile_data",
    "profile_figure",
    "ratio_data",
    "ratio_figure",
    "repeated_block",
    "run_figures",
    "run_style",
    "shorten_label",
    "signal_heatmap_data",
    "signal_heatmap_figure",
    "update_ratio_data",
    "update_ratio_figure",
]


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
