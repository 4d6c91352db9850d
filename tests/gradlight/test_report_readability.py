"""Reports of short runs and big models read well: the runs behind the browser screenshots, checked as data.

Four real runs, recorded with ``GradientFlowRecorder`` in a plain loop: a small CNN (torchvision
``resnet18``), a transformer with more than 100 layers (GPT-2, 18 blocks), a run with a single logged step,
and two MLPs side by side. ``benchmarks/report_screenshots.py`` draws the same runs into reports and
screenshots them in headless Chromium; here the figures' data and layout are checked without a browser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from torch import nn

from gradlight import GradientFlowRecorder
from gradlight.report import load_run, summarize
from gradlight.report.figures import (
    global_norm_figure,
    heatmap_figure,
    profile_figure,
    ratio_figure,
    update_ratio_figure,
)

Batch = tuple[torch.Tensor, torch.Tensor]


def record(
    model: nn.Module,
    batch: Callable[[int], Batch],
    loss_fn: Callable[..., torch.Tensor],
    save_dir: Path,
    *,
    steps: int,
    every: int,
) -> Path:
    """Train ``steps`` SGD steps with a recorder logging every ``every`` steps; returns the run folder."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    recorder = GradientFlowRecorder(model, save_dir, log_every_n_steps=every, on_anomaly="ignore")
    for step in range(steps):
        x, y = batch(step)
        loss = loss_fn(model(x), y)
        loss.backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
    recorder.close()
    return save_dir


def _images(step: int) -> Batch:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def small_cnn_run(root: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return record(model, _images, nn.functional.cross_entropy, root / "resnet18", steps=6, every=2)


def _tokens(step: int) -> Batch:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
    return ids, ids


class _LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=18, n_head=2)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(ids).logits


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def transformer_run(root: Path) -> Path:
    torch.manual_seed(0)
    return record(_LanguageModel(), _tokens, _lm_loss, root / "gpt2_18", steps=6, every=2)


def _regression(step: int) -> Batch:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    return x, x[:, :1].sin()


def mlp(activation: type[nn.Module], depth: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 32), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), activation()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


def one_step_run(root: Path) -> Path:
    return record(mlp(nn.Tanh), _regression, nn.functional.mse_loss, root / "one_step", steps=1, every=1)


def comparison_runs(root: Path) -> list[tuple[str, Path]]:
    return [
        (name, record(mlp(activation), _regression, nn.functional.mse_loss, root / name, steps=12, every=3))
        for name, activation in (("sigmoid", nn.Sigmoid), ("relu", nn.ReLU))
    ]


# ------------------------------------------------------------------------------------------------ checks
def _tick_labels(ax: Axes, axis: str = "x") -> list[str]:
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks if t.get_text()]


def _overlapping(fig: Any, ax: Axes) -> bool:
    """Whether two neighbouring x tick labels overlap as drawn (rotated ones: their parallel text lines)."""
    fig.draw_without_rendering()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    rotation = math.radians(labels[0].get_rotation()) if labels else 0.0
    if rotation == 0.0:
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        return any(right.x0 < left.x1 for left, right in pairwise(boxes))
    # Rotated labels are parallel lines of text: apart when their spacing across the lines exceeds a line's height.
    height = labels[0].get_fontsize() * fig.dpi / 72.0
    anchors = sorted(ax.transData.transform((t.get_position()[0], 0))[0] for t in labels)
    return any((b - a) * math.sin(rotation) < height for a, b in pairwise(anchors))


def _integer_ticks(ax: Axes) -> bool:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


@pytest.mark.slow
def test_one_logged_step_draws_points_and_sensible_ticks(tmp_path: Path) -> None:
    frame = load_run(one_step_run(tmp_path)).frame
    for result in (ratio_figure(frame), global_norm_figure(frame)):
        for ax in result.figure.axes:
            lines = [line for line in ax.get_lines() if np.isfinite(np.asarray(line.get_ydata(), float)).any()]
            drawn = [line for line in lines if line.get_marker() not in (None, "None", "", " ")]
            assert drawn, f"{result.name}: a single point needs a marker to show"
            assert _integer_ticks(ax), (result.name, ax.get_xticks())
            low, high = ax.get_xlim()
            assert low <= 0 <= high and high - low >= 1.0, (result.name, (low, high))  # not 0 +- 0.04
    assert "loss" in global_norm_figure(frame).data and len(global_norm_figure(frame).data["loss"]) == 1
    heatmap = heatmap_figure(frame)
    assert _tick_labels(heatmap.figure.axes[0]) == ["0"]


@pytest.mark.slow
def test_a_transformers_report_names_its_layers_without_overlap(tmp_path: Path) -> None:
    run = load_run(transformer_run(tmp_path))
    layers = sorted(set(run.frame[run.frame.metric == "grad_l2"].layer) - {"__global__"})
    assert len(layers) > 100
    update = update_ratio_figure(run.frame)
    assert update is not None
    ax = update.figure.axes[0]
    names = _tick_labels(ax)
    assert 10 <= len(names) <= 24  # thinned, and layer names (the end of one), not depth numbers
    assert all(any(layer.endswith(name.lstrip("…")) for layer in layers) for name in names), names
    assert not _overlapping(update.figure, ax)
    heatmap = heatmap_figure(run.frame)
    assert len(_tick_labels(heatmap.figure.axes[0], "y")) <= 50
    assert _integer_ticks(heatmap.figure.axes[0])
    profile = profile_figure(run.frame, sizes=None)
    assert profile.data["view"] == "block" and not _overlapping(profile.figure, profile.figure.axes[0])


def _legend_clear_of_data(ax: Axes) -> bool:
    """Whether the legend's box lies outside the axes' plotting area (it cannot cover a point)."""
    legend = ax.get_legend()
    assert legend is not None
    ax.figure.draw_without_rendering()
    box, area = legend.get_window_extent(), ax.get_window_extent()
    return box.y0 >= area.y1 - 1 or box.x0 >= area.x1 - 1


@pytest.mark.slow
def test_the_profile_legend_covers_no_point_on_resnet18_and_its_slope_is_the_tables(tmp_path: Path) -> None:
    run = load_run(small_cnn_run(tmp_path))
    profile = profile_figure(run.frame)
    assert _legend_clear_of_data(profile.figure.axes[0])
    # One unit: the legend's slope at the last step is the summary table's, in decades/layer.
    last = profile.data["slopes"][-1]
    assert math.isclose(last, summarize(run).profile_slope, rel_tol=1e-12)
    texts = [t.get_text() for t in profile.figure.axes[0].get_legend().get_texts()]
    assert any(f"{last:+.2g} decades/layer" in text for text in texts), texts
    assert "profile slope (decades/layer)" in summarize(run).as_row()
    update = update_ratio_figure(run.frame)
    assert update is not None and _legend_clear_of_data(update.figure.axes[0])
    assert all("." in name or name in {"conv1", "bn1", "fc"} for name in _tick_labels(update.figure.axes[0]))


@pytest.mark.slow
def test_two_runs_compare(tmp_path: Path) -> None:
    from gradlight.report.figures import compare_profiles_data, compare_ratios_data

    runs = [load_run(path, label=name) for name, path in comparison_runs(tmp_path)]
    profiles, ratios = compare_profiles_data(runs), compare_ratios_data(runs)
    assert profiles["sigmoid"]["last_step"] == profiles["relu"]["last_step"] == 9
    assert ratios["sigmoid"]["steps"].tolist() == [0, 3, 6, 9]
    # The sigmoid stack vanishes, the ReLU one does not: the comparison shows the difference it is for.
    assert np.nanmedian(ratios["sigmoid"]["ratio"]) < np.nanmedian(ratios["relu"]["ratio"]) / 10
