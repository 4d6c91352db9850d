"""Signal figures and parameter-profile views, checked against references computed from real models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradlight.history import COLUMNS, HistoryWriter, load_history
from gradlight.report import build_report, load_run
from gradlight.report.figures import (
    compare_gains_figure,
    gain_profile_figure,
    layer_sizes,
    profile_figure,
    repeated_block,
    run_figures,
    signal_heatmap_figure,
)
from gradlight.signal import BackwardSignalTaps
from tests.gradlight.test_signal import WIDTH, TwiceShared, batch, block_mlp, reference_signals

IMG = re.compile(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"')
STEPS = (0, 5, 10)


def layer_norms(net: nn.Module) -> dict[str, float]:
    """Gradient L2 norm per child of ``net`` (the layer grouping ``group_by=1``)."""
    squares: dict[str, float] = {}
    for name, param in net.named_parameters():
        assert param.grad is not None
        layer = name.split(".")[0]
        squares[layer] = squares.get(layer, 0.0) + param.grad.square().sum().item()
    return {layer: math.sqrt(value) for layer, value in squares.items()}


def train_and_record(save_dir: Path, net: nn.Module, steps: int = 11) -> dict[int, list[Tensor]]:
    """Train ``net`` with SGD; on the steps in :data:`STEPS` tap the signal and write it with the layers' norms.

    Returns the reference signals (``torch.autograd.grad`` on the block outputs) of every recorded step.
    """
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    taps = BackwardSignalTaps(net, group_by=1)
    writer = HistoryWriter(save_dir)
    references: dict[int, list[Tensor]] = {}
    x, y = batch()
    for step in range(steps):
        logged = step in STEPS
        if logged:
            assert isinstance(net, nn.Sequential)
            references[step] = reference_signals(net, x, y)
            taps.start()
        optimizer.zero_grad()
        F.mse_loss(net(x), y).backward()
        if logged:
            taps.stop()
            stats = taps.finalize(step)
            assert stats is not None
            norms = layer_norms(net)
            writer.append_step(step, list(norms), np.arange(len(norms)), {"grad_l2": np.array(list(norms.values()))})
            writer.append_step(step, stats.blocks, stats.depths, stats.metrics)
        optimizer.step()
    writer.close()
    sizes = {str(i): sum(p.numel() for p in child.parameters()) for i, child in enumerate(net.children())}
    info = {"layers": [{"name": name, "depth": i, "num_params": n} for i, (name, n) in enumerate(sizes.items())]}
    (save_dir / "run.json").write_text(json.dumps(info))
    return references


def test_signal_heatmap_shows_the_reference_signal_per_block_and_step(tmp_path: Path) -> None:
    references = train_and_record(tmp_path, block_mlp())
    history = load_history(tmp_path)
    result = signal_heatmap_figure(history)
    assert result is not None and result.name == "signal_heatmap"
    assert result.data["layers"] == [str(i) for i in range(8)] and result.data["steps"].tolist() == list(STEPS)
    expected = np.array([[g.norm().item() for g in references[step]] for step in STEPS]).T
    np.testing.assert_allclose(result.data["log10"], np.log10(expected), atol=1e-5)
    assert result.figure.axes[0].get_ylabel() == "block (forward order, input at top)"
    rms = signal_heatmap_figure(history, view="rms")
    assert rms is not None
    elements = np.array([64 * WIDTH] * 7 + [64])[:, None]
    np.testing.assert_allclose(rms.data["log10"], np.log10(expected / np.sqrt(elements)), atol=1e-5)
    with pytest.raises(ValueError, match="`view` must be one of"):
        signal_heatmap_figure(history, view="max")


def test_gain_profile_reads_where_the_signal_is_lost(tmp_path: Path) -> None:
    references = train_and_record(tmp_path, block_mlp())
    history = load_history(tmp_path)
    result = gain_profile_figure(history)
    assert result is not None and result.data["step"] == 10
    norms = np.array([g.norm().item() for g in references[10]])
    np.testing.assert_allclose(result.data["signal_l2"], norms, rtol=1e-5)
    assert math.isnan(result.data["gain"][0])
    np.testing.assert_allclose(result.data["gain"][1:], np.log10(norms[:-1] / norms[1:]), atol=1e-5)
    # Decades lost from the loss side to each block's input: a telescoping sum of the gains after it.
    np.testing.assert_allclose(result.data["decades_to_input"][1:], np.log10(norms[:-1] / norms[-1]), atol=1e-5)
    np.testing.assert_allclose(result.data["decades_to_input"][3], result.data["gain"][3:].sum(), atol=1e-5)
    gains = np.array([[np.log10(references[s][b - 1].norm().item() / references[s][b].norm().item()) for s in STEPS]
                      for b in range(1, 8)])  # fmt: skip
    np.testing.assert_allclose(result.data["gain_median"][1:], np.median(gains, axis=1), atol=1e-5)
    first = gain_profile_figure(history, step=0)
    assert first is not None and first.data["step"] == 0
    with pytest.raises(ValueError, match="`step` 3 is not a recorded step"):
        gain_profile_figure(history, step=3)
    bars = [patch.get_height() for patch in result.figure.axes[1].patches]
    np.testing.assert_allclose(sorted(bars), np.sort(result.data["gain"][1:]), atol=1e-12)  # block 0 has none


def test_a_shared_block_is_labelled_with_its_calls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TwiceShared()
    taps = BackwardSignalTaps(net)
    writer = HistoryWriter(tmp_path)
    x, y = batch(32)
    taps.start()
    F.mse_loss(net(x), y).backward()
    taps.stop()
    stats = taps.finalize(0)
    assert stats is not None
    writer.append_step(0, stats.blocks, stats.depths, stats.metrics)
    writer.close()
    result = gain_profile_figure(load_history(tmp_path))
    assert result is not None and result.data["calls"].tolist() == [1, 2, 1]
    labels = [label.get_text() for label in result.figure.axes[1].get_xticklabels()]
    assert labels == ["inp", "shared (calls 2)", "out"]


def test_report_shows_the_signal_figures_only_for_runs_that_tapped_it(tmp_path: Path) -> None:
    train_and_record(tmp_path / "sigmoid", block_mlp())
    train_and_record(tmp_path / "batchnorm", block_mlp(bn=True))
    runs = [load_run(tmp_path / "sigmoid"), load_run(tmp_path / "batchnorm")]
    names = [result.name for result in run_figures(runs[0])]
    assert names[:4] == ["heatmap", "profile", "signal_heatmap", "gain_profile"]
    comparison = compare_gains_figure(runs)
    assert comparison is not None
    for run in runs:
        own = gain_profile_figure(run.frame)
        assert own is not None
        np.testing.assert_array_equal(comparison.data[run.label]["gain"], own.data["gain"])
    sigmoid, normed = (comparison.data[run.label]["gain"][1:7] for run in runs)
    assert (normed > sigmoid).all()  # BatchNorm takes the gains towards 0 decades
    page = build_report([tmp_path / "sigmoid"], tmp_path / "out", progress=False).read_text()
    assert "Backward signal per block and step" in page and "Backward signal and gain per block" in page
    # A run without signal rows draws neither figure, and a comparison of such runs has no gain figure.
    frame = runs[0].frame
    plain = frame[~frame["metric"].str.startswith("signal_")]
    assert signal_heatmap_figure(plain) is None and gain_profile_figure(plain) is None
    runs[0].frame = plain
    assert [r.name for r in run_figures(runs[0])][:3] == ["heatmap", "profile", "ratio"]
    assert compare_gains_figure([runs[0]]) is None


def test_run_comparison_includes_the_gains_only_when_a_run_tapped_the_signal(tmp_path: Path) -> None:
    train_and_record(tmp_path / "sigmoid", block_mlp())
    train_and_record(tmp_path / "batchnorm", block_mlp(bn=True))
    page = build_report([tmp_path / "sigmoid", tmp_path / "batchnorm"], tmp_path / "both", progress=False)
    comparison = page.read_text().split("<h2>Comparison</h2>")[1].split("<h2>Run:")[0]
    assert "Block gains" in comparison and (tmp_path / "both" / "compare_gains.png").is_file()
    for name in ("sigmoid", "batchnorm"):  # the same runs without their signal rows
        frame = load_history(tmp_path / name)
        plain = tmp_path / f"{name}_plain"
        writer = HistoryWriter(plain)
        for step, rows in frame[~frame["metric"].str.startswith("signal_")].groupby("step"):
            for metric, part in rows.groupby("metric"):
                writer.append_step(
                    int(step), list(part["layer"]), part["depth"].to_numpy(), {str(metric): part["value"].to_numpy()}
                )
        writer.close()
        (plain / "run.json").write_text((tmp_path / name / "run.json").read_text())
    page = build_report([tmp_path / "sigmoid_plain", tmp_path / "batchnorm_plain"], tmp_path / "plain", progress=False)
    assert "Block gains" not in page.read_text() and not (tmp_path / "plain" / "compare_gains.png").exists()


# ------------------------------------------------------------------------ parameter profile views
def gpt2_frame() -> tuple[pd.DataFrame, dict[str, int]]:
    """One backward of a 6-block GPT-2 built from a config: per-module gradient norms as a history frame."""
    from transformers import GPT2Config, GPT2LMHeadModel  # a dev dependency; built from a config, no download

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=6, n_head=4))
    tokens = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).loss.backward()
    squares: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():  # forward order of the modules = registration order here
        module = name.rpartition(".")[0]
        assert param.grad is not None
        squares[module] = squares.get(module, 0.0) + param.grad.square().sum().item()
        sizes[module] = sizes.get(module, 0) + param.numel()
    rows = [(0, layer, depth, "grad_l2", math.sqrt(value)) for depth, (layer, value) in enumerate(squares.items())]
    return pd.DataFrame(rows, columns=COLUMNS), sizes


def mean_tooth(values: np.ndarray) -> float:
    """Mean absolute step between neighbouring points, in decades."""
    return float(np.abs(np.diff(np.log10(values))).mean())


def test_block_view_removes_the_gpt2_sawtooth_and_is_the_default() -> None:
    frame, sizes = gpt2_frame()
    layer = profile_figure(frame, view="layer")
    element = profile_figure(frame, view="element", sizes=sizes)
    block = profile_figure(frame, view="block")
    default = profile_figure(frame, sizes=sizes)
    inside = [i for i, name in enumerate(layer.data["layers"]) if ".h." in name]
    assert len(inside) == 36
    # Per layer, LayerNorm (128 parameters) next to Linear (12,288 or more): teeth of over a decade.
    assert mean_tooth(layer.data["grad_l2"][0][inside]) > 1.0
    sized = np.array([sizes[name] for name in layer.data["layers"]], dtype=np.float64)
    np.testing.assert_allclose(element.data["grad_l2"][0], layer.data["grad_l2"][0] / np.sqrt(sized))
    assert 0.3 < mean_tooth(element.data["grad_l2"][0][inside]) < mean_tooth(layer.data["grad_l2"][0][inside])
    blocks = block.data["layers"]
    h = [i for i, name in enumerate(blocks) if ".h." in name]
    assert [blocks[i] for i in h] == [f"transformer.h.{i}" for i in range(6)]
    assert mean_tooth(block.data["grad_l2"][0][h]) < 0.1  # whole blocks: the trend over depth, no teeth
    first = [i for i, name in enumerate(layer.data["layers"]) if name.startswith("transformer.h.0.")]
    assert block.data["grad_l2"][0][h[0]] == pytest.approx(np.sqrt((layer.data["grad_l2"][0][first] ** 2).sum()))
    assert default.data["view"] == "block"
    np.testing.assert_array_equal(default.data["grad_l2"], block.data["grad_l2"])


def test_profile_views_validate_their_inputs(tmp_path: Path) -> None:
    frame = pd.DataFrame([(0, "net.0", 0, "grad_l2", 1.0), (0, "net.2", 1, "grad_l2", 2.0)], columns=COLUMNS)
    assert profile_figure(frame).data["view"] == "layer"  # no repeated blocks of several layers
    with pytest.raises(ValueError, match=r"`view='element'` needs the number of elements .* \['net\.2'\]"):
        profile_figure(frame, view="element", sizes={"net.0": 4})
    with pytest.raises(ValueError, match="`view` must be one of"):
        profile_figure(frame, view="blocks")
    assert repeated_block("layer1.0.conv1") == "layer1.0" and repeated_block("head") == "head"
    assert layer_sizes({}) is None and layer_sizes({"layers": [{"name": "a", "num_params": 3}]}) == {"a": 3}
