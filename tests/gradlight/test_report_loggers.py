"""Figures and histograms to the Trainer's loggers: a failing logger warns once per caller (``report.loggers``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gradlight.report.loggers import log_figures, log_gradient_histograms


def _history() -> pd.DataFrame:
    rows = [
        {"step": step, "layer": layer, "depth": depth, "metric": "grad_l2", "value": 10.0**-depth * (step + 1)}
        for step in range(3)
        for depth, layer in enumerate(["net.0", "net.2"])
    ]
    return pd.DataFrame(rows)


def _failing_tensorboard(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> TensorBoardLogger:
    logger = TensorBoardLogger(tmp_path, name=name)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(logger.experiment, "add_figure", disk_full)
    monkeypatch.setattr(logger.experiment, "add_histogram", disk_full)
    return logger


def _sent_warnings(call: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "disk full" in str(w.message)]


def test_a_failing_logger_warns_once_per_shared_set_not_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (_failing_tensorboard(tmp_path, name, monkeypatch) for name in ("a", "b"))
    history = _history()
    monitor_a: set[tuple[str, str]] = set()  # what one monitor keeps across its calls
    messages = _sent_warnings(lambda: log_figures([first], history, 1, figures=["profile"], warned=monitor_a))
    assert len(messages) == 1 and "TensorBoardLogger" in messages[0]
    assert _sent_warnings(lambda: log_figures([first], history, 2, figures=["profile"], warned=monitor_a)) == []
    # Another monitor (its own set) and a call without a set are told, although the type already failed once.
    monitor_b: set[tuple[str, str]] = set()
    assert len(_sent_warnings(lambda: log_figures([second], history, 1, figures=["profile"], warned=monitor_b))) == 1
    assert len(_sent_warnings(lambda: log_figures([first, second], history, 3, figures=["heatmap"]))) == 1
    grads = {"net.0": torch.ones(4)}
    assert len(_sent_warnings(lambda: log_gradient_histograms([first], grads, 1, warned=monitor_a))) == 1
    assert _sent_warnings(lambda: log_gradient_histograms([first], grads, 2, warned=monitor_a)) == []
