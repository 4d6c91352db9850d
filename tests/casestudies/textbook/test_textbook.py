"""Small versions of the textbook experiments: each asserts the *direction* of an effect, with margins."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from casestudies.textbook import classic, decay, exploding, recurrent
from casestudies.textbook.__main__ import main
from casestudies.textbook.common import (
    DOES_NOT_HOLD,
    HOLDS,
    HOLDS_ONLY_WHEN,
    VERDICT_CLASSES,
    Claim,
    build_report,
    fit_decay,
    global_series,
    load_findings_of,
    verdict_class_of,
)
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


#: The intermediate variants train 2 epochs: their gradient ratios are set in the first epoch, and
#: sigmoid + BN passes 90% in epoch 2 of the full run.
INTERMEDIATE_EPOCHS = 2


@pytest.fixture(scope="module")
def classic_rows(quick: StudyConfig, classic_runs: dict) -> dict[str, dict]:
    """``classic.summarize`` rows of the demo, the fix (quick epochs) and the intermediate variants."""
    out = classic_runs["out"]
    short = replace(quick, classic_epochs=INTERMEDIATE_EPOCHS)
    by_name = {variant.name: variant for variant in classic.VARIANTS}
    rows = {}
    for name in (classic.BASELINE, classic.FIX, *classic.INTERMEDIATE):
        if name in classic_runs["results"]:
            epochs, history = classic_runs["results"][name]
        else:
            epochs, history = classic.run_variant(by_name[name], short, out)
        rows[name] = {**classic.summarize(by_name[name], epochs, history, 0.5, out), "max_acc": epochs.val_acc.max()}
    return rows


def test_quick_config_runs_the_intermediate_variants(quick: StudyConfig) -> None:
    assert quick.classic_variants is not None
    assert set(classic.INTERMEDIATE) | {classic.BASELINE, classic.FIX} <= set(quick.classic_variants)
    assert set(classic.INTERMEDIATE) <= {variant.name for variant in classic.VARIANTS}


def test_bn_and_residual_raise_the_sigmoid_nets_gradient_ratio(classic_rows: dict) -> None:
    base = classic_rows[classic.BASELINE]["first_over_head_median"]
    assert classic_rows["sigmoid_bn_sgd"]["first_over_head_median"] > 1e6 * base
    assert classic_rows["sigmoid_res_sgd"]["first_over_head_median"] > 1e4 * base
    assert classic_rows["sigmoid_bn_sgd"]["val_acc_final"] > 0.85  # BN alone rescues the sigmoid net


def test_adam_alone_neither_changes_the_ratio_nor_learns(classic_rows: dict) -> None:
    base, adam = classic_rows[classic.BASELINE], classic_rows["sigmoid_adam"]
    assert abs(math.log10(adam["first_over_head_median"] / base["first_over_head_median"])) < 1.0
    assert abs(adam["val_acc_final"] - 0.5) < 0.1 and adam["max_acc"] < 0.65


def test_relu_with_default_init_raises_the_ratio_but_stays_far_below_the_fix(classic_rows: dict) -> None:
    base, relu, fix = (classic_rows[n]["first_over_head_median"] for n in (classic.BASELINE, "relu_sgd", classic.FIX))
    assert 1e3 * base < relu < 1e-2 * fix
    assert abs(classic_rows["relu_sgd"]["val_acc_final"] - 0.5) < 0.1 and classic_rows["relu_sgd"]["max_acc"] < 0.65


def test_classic_claims_from_the_quick_runs(quick: StudyConfig, classic_rows: dict) -> None:
    found = classic.claims(pd.DataFrame(list(classic_rows.values())), quick)
    assert {c.verdict_class for c in found} <= set(VERDICT_CLASSES) and len(found) == 4
    assert found[0].claim.startswith("A 10-layer sigmoid MLP") and found[0].verdict_class == HOLDS
    assert found[2].claim.startswith("gradlight's diagnosis") and found[2].verdict_class == HOLDS


def test_report_over_monitored_runs(classic_runs: dict, tmp_path: Path) -> None:
    run_dir = classic_runs["out"] / "runs" / "classic" / classic.BASELINE
    report = build_report([f"sigmoid={run_dir}"], tmp_path / "report")
    assert report == tmp_path / "report" / "report.html" and report.stat().st_size > 0
    findings = load_findings_of(run_dir)
    assert (findings["kind"] == "vanishing").any()


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
@pytest.mark.parametrize("broken", ["large_init", "large_lr"])
def test_clipping_bounds_the_applied_gradient(quick: StudyConfig, tmp_path: Path, broken: str) -> None:
    specs = {spec.name: spec for spec in exploding.runs_for(quick)}
    blown, _, _ = exploding.run_one(specs[broken], quick, tmp_path)
    clipped, history, applied = exploding.run_one(specs[f"{broken}_clipped"], quick, tmp_path)
    assert blown["nonfinite_steps"] > 0 or blown["growth_max_over_step0"] > 1e3
    raw = global_series(history, "global_grad_l2").to_numpy()
    clip = quick.clip_val
    assert len(applied) == len(raw) == clipped["steps"] > 0
    assert np.isfinite(raw).all() and np.isfinite(applied).all() and clipped["weights_finite_end"]
    assert (raw > clip).any()  # clipping had something to do
    assert (applied <= clip * (1 + exploding.CLIP_TOLERANCE)).all()  # every step the optimizer applied
    np.testing.assert_allclose(applied, np.minimum(raw, clip), rtol=1e-4)  # = min(raw, clip): it is the clipping
    assert clipped["nonfinite_steps"] == clipped["applied_over_clip_steps"] == 0
    assert clipped["update_ratio_max"] < 1.0 and not math.isfinite(blown["update_ratio_max"])
    if broken == "large_lr":  # clipping also keeps the weights, hence the raw gradient, small (not at 3x init)
        assert clipped["grad_l2_max_finite"] < 0.1 * blown["grad_l2_max_finite"]
    assert blown["findings_non_finite"] >= 1 and clipped["findings_non_finite"] == 0
    found = {c.claim: c.verdict_class for c in exploding.claims(pd.DataFrame([blown, clipped]), quick)}
    blows_up, clipping = (next(v for k, v in found.items() if k.startswith(s)) for s in ("With a", "Gradient clip"))
    assert blows_up == HOLDS and clipping in (HOLDS, HOLDS_ONLY_WHEN)


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_quick_writes_summary_and_figures(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--quick", "--only", "decay", "recurrent", "--no-report"]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == ["experiment", "claim", "claimed", "measured", "verdict_class", "verdict"]
    assert set(summary.experiment) == {"decay", "recurrent"}
    assert summary.verdict_class.isin(VERDICT_CLASSES).all()
    assert [verdict_class_of(v) for v in summary.verdict] == summary.verdict_class.tolist()
    for name in ("summary.md", "decay_slopes.csv", "decay_profiles.png", "decay_slopes.png", "recurrent.png"):
        assert (tmp_path / name).stat().st_size > 0


# ------------------------------------------------------------------------------- verdicts are computed
def test_verdicts_follow_the_measurements(quick: StudyConfig) -> None:
    fake_rows = pd.DataFrame(
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
    found = classic.claims(fake_rows, quick)
    assert len(found) == 3 and all(c.verdict_class == DOES_NOT_HOLD for c in found)

    row = {
        "steps": 10,
        "grad_l2_step0": 1.0,
        "grad_l2_max_finite": 2.0,
        "grad_l2_last": 1.0,
        "growth_max_over_step0": 2.0,
        "early_late_ratio_step0": 1.0,
        "nonfinite_steps": 0,
        "update_ratio_max": 0.1,
        "clip": 1.0,
        "applied_grad_l2_max": 1.0,
        "applied_nonfinite_steps": 0,
        "applied_over_clip_steps": 0.0,
        "weights_finite_end": True,
        "val_acc_final": 0.95,
        "findings_exploding": 0.0,
        "findings_non_finite": 0.0,
    }
    table = pd.DataFrame([{"run": name, **row} for name in ("baseline", "large_lr", "large_lr_clipped")])
    clip_claim = f"Gradient clipping (norm {quick.clip_val:g}) stops the blow-up (learning rate {quick.explode_lr:g})"

    def verdicts(**clipped: object) -> dict[str, str]:
        frame = table.copy()
        for column, value in clipped.items():
            frame.loc[frame.run == "large_lr_clipped", column] = value
        return {c.claim: c.verdict_class for c in exploding.claims(frame, quick)}

    assert set(verdicts(nonfinite_steps=3).values()) == {DOES_NOT_HOLD}
    assert verdicts(applied_over_clip_steps=2.0)[clip_claim] == DOES_NOT_HOLD  # the applied norm exceeded clip
    assert verdicts(weights_finite_end=False)[clip_claim] == DOES_NOT_HOLD
    assert verdicts()[clip_claim] == HOLDS
    assert verdicts(val_acc_final=0.6)[clip_claim] == HOLDS_ONLY_WHEN  # bounded, but no learning


@pytest.mark.parametrize(
    ("verdict_class", "verdict"),
    [
        ("holds only partly", ""),
        (HOLDS, "holds only partly: no NaN/Inf"),
        (HOLDS, "holds for the whole net, not early vs late"),
        (HOLDS, "does not hold"),
        (HOLDS_ONLY_WHEN, "holds at init"),
        (DOES_NOT_HOLD, "holds"),
    ],
)
def test_claims_refuse_verdicts_outside_the_three_classes(verdict_class: str, verdict: str) -> None:
    with pytest.raises(ValueError):
        Claim("classic", "c", "claimed", "measured", verdict_class, verdict)


def test_verdict_text_starts_with_its_class() -> None:
    assert Claim("classic", "c", "x", "y", HOLDS).verdict == HOLDS
    assert verdict_class_of("holds (for the whole net)") == HOLDS
    assert verdict_class_of("holds only when the init is right (mlp/he)") == HOLDS_ONLY_WHEN
    assert verdict_class_of("does not hold: relu_he_sgd alone reaches 90%") == DOES_NOT_HOLD
    assert verdict_class_of("holds only partly") is None and verdict_class_of("holds at init") is None
