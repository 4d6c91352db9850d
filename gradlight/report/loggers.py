"""Where report figures go during training: the Trainer's loggers (Trainer-free; pass ``trainer.loggers``).

Loggers are duck-typed, none of their packages is imported here:

* TensorBoard (``logger.experiment.add_figure`` / ``add_histogram``): figures and gradient histograms.
* Weights & Biases (``logger.log_image``): figures as RGB images.
* MLflow (``logger.experiment.log_figure`` with ``logger.run_id``): figures as PNG artifacts.
* Comet (``logger.experiment.log_figure`` without ``run_id``): figures.
* Anything else (CSV, ...): nothing.

A logger that raises does not stop training: the error becomes one warning per logger type and per kind of
payload, once per call, or once per caller when it passes its own ``warned`` set (e.g. one per monitor).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradlight.history import read_history
from gradlight.report.figures import FigureResult, heatmap_figure, profile_figure

__all__ = ["DEFAULT_FIGURES", "log_figures", "log_gradient_histograms", "logger_kind"]

#: Figures :func:`log_figures` sends by default.
DEFAULT_FIGURES = ("heatmap", "profile")
_BUILDERS = {"heatmap", "profile"}


def logger_kind(logger: Any) -> str:
    """How figures reach ``logger``: ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"comet"`` or ``"none"``.

    Example:
        >>> logger_kind(object())
        'none'
    """
    if hasattr(logger, "log_image"):
        return "wandb"
    experiment = _experiment(logger)
    if experiment is None:
        return "none"
    if callable(getattr(experiment, "add_figure", None)):
        return "tensorboard"
    if callable(getattr(experiment, "log_figure", None)):
        return "mlflow" if getattr(logger, "run_id", None) is not None else "comet"
    return "none"


def _experiment(logger: Any) -> Any:
    try:
        return getattr(logger, "experiment", None)
    except Exception:  # a logger whose backend is unavailable
        return None


def _warn_once(warned: set[tuple[str, str]], logger: Any, what: str, err: Exception) -> None:
    key = (type(logger).__name__, what)
    if key in warned:
        return
    warned.add(key)
    warnings.warn(
        f"gradlight: could not send {what} to {type(logger).__name__}: {err!r} (training continues)",
        RuntimeWarning,
        stacklevel=3,
    )


def _rgb(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _send_figure(logger: Any, kind: str, tag: str, figure: Figure, step: int) -> bool:
    if kind == "tensorboard":
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    elif kind == "wandb":
        logger.log_image(key=tag, images=[_rgb(figure)], step=step)
    elif kind == "mlflow":
        logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step-{step:07d}.png")
    elif kind == "comet":
        logger.experiment.log_figure(figure_name=tag, figure=figure, step=step)
    else:
        return False
    return True


def _history_frame(history: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        return history
    return read_history(Path(history)).frame


def log_figures(
    loggers: Iterable[Any],
    history: pd.DataFrame | str | os.PathLike[str],
    step: int,
    *,
    findings: Sequence[Mapping[str, Any] | Any] = (),
    figures: Sequence[str] = DEFAULT_FIGURES,
    prefix: str = "gradflow",
    warned: set[tuple[str, str]] | None = None,
) -> int:
    """Draw the heat map and the gradient-flow profile and send them to every logger that takes images.

    Call it on rank zero only, with the history flushed to disk (or a DataFrame of it), e.g. at the end of
    fit or of each validation epoch. Figures are drawn only if some logger takes them.

    Args:
        loggers: The loggers, e.g. ``trainer.loggers``.
        history: A history DataFrame (long format) or a monitor ``save_dir``.
        step: The global step to log the figures at.
        findings: Findings to mark on the heat map: ``monitor.recorder.findings`` (``Finding`` objects) or dicts with
            ``kind``, ``layer``, ``step``.
        figures: Which figures: any of ``"heatmap"``, ``"profile"``.
        prefix: Tag prefix; tags are ``<prefix>/<figure>``.
        warned: ``(logger type, payload)`` pairs already warned about; pass the same set on every call (one
            per monitor) so that a failing logger warns once. By default a new set per call.

    Returns:
        How many (logger, figure) pairs were sent.

    Example:
        >>> from gradlight.report.loggers import log_figures
        >>> log_figures(trainer.loggers, monitor.save_dir, trainer.global_step)  # doctest: +SKIP
        2
    """
    unknown = [name for name in figures if name not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {sorted(_BUILDERS)}")
    targets = [(logger, kind) for logger in loggers if (kind := logger_kind(logger)) != "none"]
    if not targets:
        return 0
    frame = _history_frame(history)
    if frame.empty or not (frame["metric"] == "grad_l2").any():
        return 0
    warned = set() if warned is None else warned
    sent = 0
    for name in figures:
        result: FigureResult = heatmap_figure(frame, findings) if name == "heatmap" else profile_figure(frame)
        for logger, kind in targets:
            try:
                sent += int(_send_figure(logger, kind, f"{prefix}/{name}", result.figure, step))
            except Exception as err:
                _warn_once(warned, logger, f"the {name} figure", err)
        result.figure.clear()
    return sent


def log_gradient_histograms(
    loggers: Iterable[Any],
    values: Mapping[str, Any],
    step: int,
    *,
    prefix: str = "gradflow/grad",
    warned: set[tuple[str, str]] | None = None,
) -> int:
    """Send one histogram per layer (e.g. its gradient tensor) to the loggers that take histograms.

    Only TensorBoard-like loggers (``experiment.add_histogram``) take them; others are skipped. Tensors may
    live on any device (TensorBoard copies them to the host): call this on logged steps only.

    Args:
        loggers: The loggers, e.g. ``trainer.loggers``.
        values: ``{layer: tensor or array}``, e.g. the layer's concatenated gradients.
        step: The global step.
        prefix: Tag prefix; tags are ``<prefix>/<layer>``.
        warned: As for :func:`log_figures`.

    Returns:
        How many histograms were sent.

    Example:
        >>> grads = {name: p.grad for name, p in model.named_parameters()}  # doctest: +SKIP
        >>> log_gradient_histograms(trainer.loggers, grads, trainer.global_step)  # doctest: +SKIP
    """
    warned = set() if warned is None else warned
    sent = 0
    for logger in loggers:
        if logger_kind(logger) != "tensorboard":
            continue
        experiment = logger.experiment
        if not callable(getattr(experiment, "add_histogram", None)):
            continue
        for layer, tensor in values.items():
            if tensor is None:
                continue
            array = _host(tensor)
            if array.size == 0:
                continue
            try:
                experiment.add_histogram(f"{prefix}/{layer}", array, global_step=step)
                sent += 1
            except Exception as err:
                _warn_once(warned, logger, "gradient histograms", err)
                break
    return sent


def _host(tensor: Any) -> np.ndarray:
    """A flat float64 host array of the finite values (TensorBoard rejects NaN/inf and bfloat16)."""
    detach = getattr(tensor, "detach", None)
    if detach is not None:
        tensor = detach().double().cpu().numpy()
    array = np.asarray(tensor, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]
