"""Small versions of the textbook experiments: each asserts the *direction* of an effect, with margins."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from casestudies.textbook import classic, decay, exploding, recurrent
from casestudies.textbook.__main__ import main
from casestudies.textbook.common import build_report, diagnosis_available, fit_decay, load_findings_of
from casestudies.textbook.config import StudyConfig
from casestudies.textbook.models import CNN, MLP, NetSpec, RecurrentClassifier, initialize_
from gradlight.tracker import early_late_ratio


@pytest.fixture(scope="module")
def quick() -> StudyConfig:
    return StudyConfig.quick()


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "silu"])
def test_models_have_explicit_switches_and_own_activations(activation: str) -> None:
    net = MLP(10, 16, 4, NetSpec(activation, norm=True, residual=True, init="he"))
    acts = [block.act for block in net.blocks]
    assert len({id(a) for a in acts}) == len(acts)  # no shared activation object
    assert all(not getattr(a, "inplace", False) for a in acts)
    assert all(isinstance(block.norm, nn.BatchNorm1d) for block in net.blocks)
    assert [block.residual for block in net.blocks] == [False, True, True, True]  # first block changes shape
    cnn = CNN(1, 4, 3, NetSpec(activation, norm=False, residual=False))
    assert all(isinstance(block.norm, nn.Identity) and not block.residual for block in cnn.blocks)
    assert net(torch.randn(5, 10)).shape == (5, 1) and cnn(torch.randn(5, 1, 6, 6)).shape == (5, 1)


def test_init_variances() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(512, 512))
    initialize_(layer, "he")
    assert layer[0].weight.var().item() == pytest.approx(2 / 512, rel=0.05)
    initialize_(layer, "xavier", scale=3.0)
    assert layer[0].weight.var().item() == pytest.approx(9 * 2 / 1024, rel=0.05)
    assert float(layer[0].bias.detach().abs().max()) == 0.0
    with pytest.raises(ValueError):
        initialize_(layer, "orthogonal")


def test_fit_decay_recovers_a_known_slope() -> None:
    depth = np.arange(8)
    slope, r2 = fit_decay(depth, 0.25 ** (7 - depth))
    assert slope == pytest.approx(math.log10(4)) and r2 == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ 1. classic demo
@pytest.fixture(scope="module")
def classic_runs(quick: StudyConfig, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("classic")
    results = {}
    for variant in classic.VARIANTS:
        if variant.name in (classic.BASELINE, classic.FIX):
            results[variant.name] = classic.run_variant(variant, quick, out)
    return {"out": out, "results": results}


def test_classic_sigmoid_sgd_stalls_while_relu_he_adam_learns(classic_runs: dict) -> None:
    stalled, _ = classic_runs["results"][classic.BASELINE]
    learned, _ = classic_runs["results"][classic.FIX]
    assert abs(stalled.val_acc.iloc[-1] - 0.5) < 0.1
    assert stalled.val_acc.max() < 0.65
    assert learned.val_acc.iloc[-1] > 0.85
    assert learned.val_acc.iloc[-1] - stalled.val_acc.iloc[-1] > 0.25


def test_classic_history_shows_where_the_gradient_went(classic_runs: dict) -> None:
    _, sigmoid_history = classic_runs["results"][classic.BASELINE]
    _, relu_history = classic_runs["results"][classic.FIX]

    def first_over_head(history: pd.DataFrame) -> float:
        rows = history[history.metric == "early_late_ratio"]
        return float(rows.value.median())

    assert first_over_head(sigmoid_history) < 1e-5
    assert first_over_head(relu_history) > 1e-2


def test_report_over_monitored_runs(classic_runs: dict, tmp_path: Path) -> None:
    run_dir = classic_runs["out"] / "runs" / "classic" / classic.BASELINE
    report = build_report([f"sigmoid={run_dir}"], tmp_path / "report")
    try:
        import gradlight.report  # noqa: F401
    except ImportError:
        assert report is None
    else:
        assert report is not None and (tmp_path / "report" / "report.html").exists()
    if diagnosis_available():
        findings = load_findings_of(run_dir)
        assert findings is not None and (findings["kind"] == "vanishing").any()


# ----------------------------------------------------------------------------------- 2. decay per layer
def test_sigmoid_stack_vanishes_far_more_than_relu_he(quick: StudyConfig) -> None:
    ratios, slopes = {}, {}
    for arch in ("mlp", "cnn"):
        x, y = decay.task(arch, quick.decay_probe, quick, seed=3)
        for spec in (NetSpec("sigmoid"), NetSpec("relu", init="he")):
            torch.manual_seed(0)
            weight, hidden = decay.measure(decay.build(arch, spec, quick), x, y)
            assert np.isfinite(weight).all() and np.isfinite(hidden).all()
            ratios[arch, spec.activation] = early_late_ratio(weight[1:])
            slopes[arch, spec.activation] = fit_decay(np.arange(len(weight) - 1), weight[1:])[0]
    for arch in ("mlp", "cnn"):
        assert ratios[arch, "sigmoid"] < 1e-4
        assert ratios[arch, "relu"] > 1e-2
        assert ratios[arch, "relu"] / ratios[arch, "sigmoid"] > 1e3
        assert slopes[arch, "sigmoid"] > 0.4  # decades lost per layer (claimed 0.60)
        assert abs(slopes[arch, "relu"]) < 0.15


def test_bn_and_residual_flatten_the_sigmoid_profile(quick: StudyConfig) -> None:
    x, y = decay.task("mlp", quick.decay_probe, quick, seed=3)
    for spec in (NetSpec("sigmoid", norm=True), NetSpec("sigmoid", residual=True)):
        torch.manual_seed(0)
        weight, _ = decay.measure(decay.build("mlp", spec, quick), x, y)
        assert abs(fit_decay(np.arange(len(weight) - 1), weight[1:])[0]) < 0.2


# ------------------------------------------------------------------------------------- 3. recurrent
def test_lstm_long_range_gradient_far_above_vanilla_rnn(quick: StudyConfig) -> None:
    ratios = {}
    for cell in recurrent.cells_for(quick):
        summary, profile = recurrent.run_cell(cell, quick)
        assert len(profile) == quick.rnn_steps
        ratios[cell.name] = summary[0]["long_range_ratio"]
    open_lstm = f"lstm_forget_bias_{quick.lstm_forget_bias:g}"
    assert ratios["rnn"] < 1e-5
    assert ratios[open_lstm] > 1e4 * ratios["rnn"]
    assert ratios["lstm"] > ratios["rnn"] and ratios["gru"] > ratios["rnn"]


def test_recurrent_hidden_grads_cover_every_step() -> None:
    torch.manual_seed(0)
    model = RecurrentClassifier("gru", vocab=4, hidden=8, classes=2)
    tokens = torch.randint(0, 4, (3, 7))
    nn.functional.cross_entropy(model(tokens, keep_hidden=True), torch.tensor([0, 1, 0])).backward()
    norms = model.hidden_grad_norms()
    assert norms.shape == (7,) and bool((norms > 0).all())


# ------------------------------------------------------------------------------------- 4. exploding
def test_clipping_bounds_the_blow_up(quick: StudyConfig, tmp_path: Path) -> None:
    rows = {}
    for spec in exploding.runs_for(quick):
        if spec.name.startswith("large_lr"):
            rows[spec.name], _ = exploding.run_one(spec, quick, tmp_path)
    blown, clipped = rows["large_lr"], rows["large_lr_clipped"]
    assert blown["nonfinite_steps"] > 0 or blown["growth_max_over_step0"] > 1e3
    assert clipped["nonfinite_steps"] == 0
    assert math.isfinite(clipped["grad_l2_last"])
    assert clipped["grad_l2_max_finite"] < 0.1 * blown["grad_l2_max_finite"]
    assert clipped["update_ratio_max"] < 1.0
    if diagnosis_available():
        assert blown["findings_non_finite"] + blown["findings_exploding"] >= 1
        assert clipped["findings_non_finite"] == 0


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_quick_writes_summary_and_figures(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--quick", "--only", "decay", "recurrent", "--no-report"]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == ["experiment", "claim", "claimed", "measured", "verdict"]
    assert set(summary.experiment) == {"decay", "recurrent"}
    assert summary.verdict.str.match(r"^(holds|does not hold)").all()
    for name in ("summary.md", "decay_slopes.csv", "decay_profiles.png", "decay_slopes.png", "recurrent.png"):
        assert (tmp_path / name).stat().st_size > 0


# ------------------------------------------------------------------------------- verdicts are computed
def test_verdicts_follow_the_measurements(quick: StudyConfig) -> None:
    classic_rows = pd.DataFrame(
        [
            {
                "variant": classic.BASELINE,
                "val_acc_final": 0.97,
                "val_acc_epoch1": 0.9,
                "chance": 0.5,
                "first_over_head_median": 0.5,
                "findings": "none",
            },
            {
                "variant": classic.FIX,
                "val_acc_final": 0.55,
                "val_acc_epoch1": 0.5,
                "chance": 0.5,
                "first_over_head_median": 0.5,
                "findings": "vanishing:1",
            },
        ]
    )
    verdicts = {c.claim.split(" (")[0]: c.verdict for c in classic.claims(classic_rows, quick)}
    assert all(v.startswith("does not hold") for v in verdicts.values())

    row = {
        "steps": 10,
        "grad_l2_step0": 1.0,
        "grad_l2_max_finite": 2.0,
        "grad_l2_last": 1.0,
        "growth_max_over_step0": 2.0,
        "early_late_ratio_step0": 1.0,
        "nonfinite_steps": 0,
        "update_ratio_max": 0.1,
        "val_acc_final": 0.95,
        "findings_exploding": 0.0,
        "findings_non_finite": 0.0,
    }
    table = pd.DataFrame([{"run": name, **row} for name in ("baseline", "large_lr", "large_lr_clipped")])
    table.loc[table.run == "large_lr_clipped", "nonfinite_steps"] = 3
    found = {c.claim: c.verdict for c in exploding.claims(table, quick)}
    assert all(v == "does not hold" for v in found.values())
