"""Diagnosis: vanishing, exploding, non-finite, dormant findings, actions, findings file, resume, DDP."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from gradlight import (
    ActivationStats,
    DiagnosisConfig,
    GradientAnomalyError,
    GradientDiagnosis,
    GradientFlowMonitor,
    ModelProfile,
    StepRecord,
    load_findings,
    load_history,
)
from gradlight.diagnosis import RULES, Finding, resolve_actions
from gradlight.diagnosis.detectors import ForwardSeen
from gradlight.runfolder import FINDINGS_FILE, FindingsWriter
from tests.gradlight._ddp_diag_workers import QUIET, Regressor, ddp_actions_worker, mlp, spawn


def fit(
    model: L.LightningModule, save_dir: Path, steps: int, trainer_kwargs: Any = None, **monitor_kwargs: Any
) -> tuple[GradientFlowMonitor, L.Trainer, list[str]]:
    monitor = GradientFlowMonitor(1, save_dir, **monitor_kwargs)
    options = {**QUIET, **(trainer_kwargs or {})}
    trainer = L.Trainer(**options, accelerator="cpu", devices=1, max_steps=steps, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    messages = [str(w.message) for w in caught if "gradlight:" in str(w.message)]
    return monitor, trainer, messages


# -------------------------------------------------------------------------------------- vanishing
def test_deep_sigmoid_mlp_is_flagged_vanishing_at_the_first_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor, _, messages = fit(Regressor(mlp(12)), tmp_path, steps=4)
    findings = load_findings(tmp_path)
    vanishing = findings[findings.kind == "vanishing"]
    assert len(vanishing) == 1
    row = vanishing.iloc[0]
    assert row.layer == "net.0"  # the first layer in forward order
    assert row.step == 0 and row.reported_step == 2  # held from step 0, reported after 3 logged steps
    assert row.evidence["decades"] > 3 and row.evidence["ratio"] < 1e-3
    assert row.evidence["reference_layers"] == ["net.20", "net.22"]
    assert row.layers[0] == "net.0" and row.evidence["onset_layer"] == row.layers[-1]
    rules = row.evidence["rules"]
    assert rules[:3] == ["saturating_activation", "no_normalization", "deep_plain_stack"]
    assert "ReLU" in row.remedy and "BatchNorm" in row.remedy and "residual" in row.remedy
    # warned exactly once (rank zero), with cause and remedy
    assert sum("vanishing gradient" in m for m in messages) == 1
    assert "Likely cause" in messages[0]
    # the history has the loss and the findings count reached the summary
    assert monitor.recorder.diagnosis is not None and monitor.recorder.diagnosis.findings_count == len(findings)


def test_relu_he_batchnorm_mlp_is_not_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, _, messages = fit(Regressor(mlp(12, act=nn.ReLU, bn=True, he=True)), tmp_path, steps=8)
    assert load_findings(tmp_path).empty
    assert messages == []


def test_a_branch_with_exactly_zero_gradient_is_not_vanishing_but_no_gradient() -> None:
    diagnosis = GradientDiagnosis()
    found = [f for step in range(4) for f in diagnosis.update(record(step, [0.0, 1e-5, 1.0, 1.0]))]
    assert [(f.kind, f.layer, f.layers) for f in found] == [("vanishing", "l1", ["l1"]), ("no_gradient", "l0", ["l0"])]
    assert found[1].evidence["zero"] == ["l0"] and "zero_gradient" in found[1].evidence["rules"]


def test_a_vanishing_gradient_that_falls_to_exactly_zero_stays_vanishing_where_the_layer_ran() -> None:
    """AUTOTRAINER's model_8de47bdc: dense0 at 6e-14 of the head for two steps, then exactly 0 (units died above)."""
    grads = [[1e-13, 1.0, 1.0], [1e-13, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    diagnosis = GradientDiagnosis()
    found = [f for step, grad in enumerate(grads) for f in diagnosis.update(record(step, grad))]
    vanishing = [f for f in found if f.kind == "vanishing"]
    assert [(f.layer, f.step, f.reported_step) for f in vanishing] == [("l0", 0, 2)]
    assert "no gradient at all now (exactly 0)" in vanishing[0].message
    assert vanishing[0].evidence["decades"] is None and vanishing[0].evidence["ratio"] == 0.0

    # the same zeros on a step whose forward did not run the layer (a skipped branch) end the streak
    skipped = GradientDiagnosis()
    ran = ForwardSeen(frozenset({"l1", "l2"}), watched=frozenset({"l0", "l1", "l2"}))
    for step, grad in enumerate(grads):
        found = skipped.update(record(step, grad), forward=ran if step >= 2 else None)
        assert not [f for f in found if f.kind == "vanishing"]


def test_a_falling_early_to_late_ratio_is_a_vanishing_trend() -> None:
    diagnosis = GradientDiagnosis(DiagnosisConfig(trend_window=4, trend_decades=2.0))
    found = []
    for step, ratio in enumerate([1.0, 0.3, 0.1, 0.03, 0.001]):
        found += diagnosis.update(record(step, [1.0, 1.0, 1.0], early_late_ratio=ratio))
    assert [(f.kind, f.layer, f.step, f.reported_step) for f in found] == [("vanishing", "l0", 1, 4)]
    assert found[0].evidence["trend_decades"] == pytest.approx(math.log10(0.3 / 0.001))


def test_one_spike_then_one_dip_of_a_noisy_ratio_is_not_a_trend() -> None:
    """A converged LSTM's ratio swings by decades from batch to batch (measured in the zoo's lstm_long: 0.62
    at one step, 0.0043 nine steps later, around 0.01 in between); a trend is a change of level."""
    noisy = [0.02, 0.01, 0.62, 0.006, 0.01, 0.012, 0.007, 0.02, 0.006, 0.0043, 0.01, 0.005]
    diagnosis = GradientDiagnosis(DiagnosisConfig(trend_window=10))
    found = [f for step, r in enumerate(noisy) for f in diagnosis.update(record(step, [1.0, 1.0], early_late_ratio=r))]
    assert found == []
    falling = [1.0, 0.8, 1.2, 0.5, 0.1, 0.05, 0.01, 0.004, 0.003, 0.002]  # the level falls from ~1 to ~3e-3
    diagnosis = GradientDiagnosis(DiagnosisConfig(trend_window=10))
    found = [
        f for step, r in enumerate(falling) for f in diagnosis.update(record(step, [1.0, 1.0], early_late_ratio=r))
    ]
    assert [(f.kind, f.step, f.reported_step) for f in found] == [("vanishing", 0, 9)]
    assert found[0].evidence["early_late_ratio_before"] == pytest.approx(1.0)  # median of the first third
    assert found[0].evidence["early_late_ratio_after"] == pytest.approx(0.003)  # median of the last third


NORMALISED = ModelProfile(normalization=["LayerNorm"])
ADAPTIVE = {f"l{i}": 0.0 for i in range(4)}  # every layer stepped by Adam, no decoupled weight decay


def small_first_layer(update: float, profile: ModelProfile, adaptive: dict[str, float] | None) -> list[Finding]:
    """Layer l0 gets 1e-5 of the reference's gradient for 4 steps and moves at ``update`` (the reference: 0.02)."""
    diagnosis = GradientDiagnosis(profile=profile)
    steps = [record(step, [1e-5, 1.0, 1.0, 1.0], [update, 0.02, 0.02, 0.02]) for step in range(4)]
    return [f for r in steps for f in diagnosis.update(r, adaptive=adaptive)]


def test_a_small_gradient_that_an_adaptive_optimizer_still_moves_behind_normalisation_is_a_note() -> None:
    found = small_first_layer(0.01, NORMALISED, ADAPTIVE)
    assert [(f.kind, f.severity, f.layer, f.step, f.reported_step) for f in found] == [
        ("vanishing", "note", "l0", 0, 2)
    ]
    evidence = found[0].evidence
    assert evidence["explained_by"] == "adaptive_update" and evidence["rules"] == ["adaptive_update_moves"]
    assert evidence["reference_update_ratio"] == pytest.approx(0.02) and evidence["update_fraction"] == pytest.approx(
        0.5
    )
    assert "still learning" in found[0].message and "LayerNorm" in found[0].message


@pytest.mark.parametrize(
    ("update", "profile", "adaptive"),
    [
        (1e-6, NORMALISED, ADAPTIVE),  # the update collapsed too (Adam's epsilon dominates, or its memory)
        (0.01, NORMALISED, None),  # optimizer unknown (a bare diagnosis, a replay) or SGD: the gradient judges
        (0.01, NORMALISED, {"l1": 0.0, "l2": 0.0, "l3": 0.0}),  # l0 in a group with coupled (L2) decay
        (0.01, ModelProfile(), ADAPTIVE),  # no normalisation: a deep sigmoid MLP under Adam
        (float("nan"), NORMALISED, ADAPTIVE),  # no update ratio recorded
    ],
    ids=["update_collapsed", "not_adaptive", "coupled_decay", "no_normalisation", "no_update_ratio"],
)
def test_a_small_gradient_is_still_vanishing_unless_the_update_shows_the_layer_moves(
    update: float, profile: ModelProfile, adaptive: dict[str, float] | None
) -> None:
    found = small_first_layer(update, profile, adaptive)
    assert [(f.kind, f.severity, f.layer) for f in found] == [("vanishing", "warning", "l0")]
    assert "explained_by" not in found[0].evidence


def test_decoupled_weight_decay_is_no_evidence_that_a_layer_learns() -> None:
    """AdamW shrinks every weight by lr * weight_decay per step whatever its gradient: that part of the update
    ratio is subtracted before it is compared with the reference layers'."""
    assert small_first_layer(5e-5, NORMALISED, ADAPTIVE)[0].severity == "note"  # 2.5e-3 of the reference
    decayed = small_first_layer(5e-5, NORMALISED, {**ADAPTIVE, "l0": 4e-5})  # 1e-5 left: 5e-4 of it
    assert [(f.severity, f.layer) for f in decayed] == [("warning", "l0")]


def test_a_falling_ratio_whose_first_layer_still_moves_behind_normalisation_is_a_note() -> None:
    def trend(update: float) -> list[Finding]:
        diagnosis = GradientDiagnosis(DiagnosisConfig(trend_window=4), profile=NORMALISED)
        found: list[Finding] = []
        for step, ratio in enumerate([1.0, 0.3, 0.1, 0.03, 0.001]):
            grads = [1.0, 1.0, 1.0, 1.0]
            found += diagnosis.update(
                record(step, grads, [update, 0.02, 0.02, 0.02], early_late_ratio=ratio), adaptive=ADAPTIVE
            )
        return found

    (moving,) = trend(0.01)
    assert (moving.kind, moving.severity, moving.layer, moving.reported_step) == ("vanishing", "note", "l0", 4)
    assert moving.evidence["explained_by"] == "adaptive_update" and "still learning" in moving.message
    (starved,) = [f for f in trend(1e-7) if f.kind == "vanishing"]  # (and `dormant`: it does not move)
    assert (starved.kind, starved.severity, starved.layer) == ("vanishing", "warning", "l0")


# --------------------------------------------------------------------------------------- exploding
def test_huge_learning_rate_is_flagged_exploding_before_the_loss_is_nan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor(mlp(4, act=nn.Tanh), lr=3.0)
    fit(model, tmp_path, steps=16, on_anomaly="ignore")
    findings = load_findings(tmp_path)
    exploding = findings[findings.kind == "exploding"]
    assert not exploding.empty
    first_nan = min(step for step, loss in model.losses.items() if not math.isfinite(loss))
    assert exploding.reported_step.min() < first_nan - 3
    for _, row in exploding.iterrows():  # the steps' size first (exploding updates), then the gradient's growth
        evidence = row.evidence
        if "median_update_ratio" in evidence:
            assert evidence["median_update_ratio"] >= 0.1 and evidence["loss_median"] >= evidence["loss_before"]
        else:
            assert evidence["growth"] >= 100 or max(evidence["layer_growth"].values()) >= 100
        assert "learning rate" in row.remedy and "clipping" in row.remedy
    # the NaN that follows is reported once, at its onset, as following the explosion
    non_finite = findings[findings.kind == "non_finite"]
    assert not non_finite.empty and non_finite.iloc[0].evidence["after_exploding"]


def record(step: int, grad: list[float], update: list[float] | None = None, **global_metrics: float) -> StepRecord:
    values = np.asarray(grad, dtype=np.float64)
    layers = [f"l{i}" for i in range(len(grad))]
    metrics = {
        "grad_l2": values,
        "grad_max_abs": values,
        "grad_nonfinite": np.zeros(len(grad)),
        "param_l2": np.ones(len(grad)),
        "update_ratio": np.asarray(update if update is not None else [1e-3] * len(grad)),
    }
    glob = {"global_grad_l2": float(np.sqrt((values**2).sum())), **global_metrics}
    return StepRecord(step, layers, np.arange(len(grad)), metrics, glob)


def test_large_updates_with_a_loss_that_does_not_fall_are_exploding_updates() -> None:
    """The zoo's VGG-11 at SGD lr 1: every layer moves 10-80% per step for five steps, the loss stays above its
    start, and only then does the gradient blow up. A fresh head moving as much with its loss falling is quiet."""
    updates = [[0.02] * 3, [0.36, 0.2, 2.3], [0.4, 0.3, 0.9], [0.3, 0.25, 0.4], [0.25, 0.2, 0.3]]
    rising = [2.307, 2.69, 3.37, 2.306, 2.49]  # the run's losses: not falling, though step 3 dips below the start
    diagnosis = GradientDiagnosis()
    found = [
        f
        for i, (u, loss) in enumerate(zip(updates, rising))
        for f in diagnosis.update(record(i, [1.0] * 3, u), loss=loss)
    ]
    assert [(f.kind, f.severity, f.layer, f.step, f.reported_step) for f in found] == [
        ("exploding", "warning", "l2", 1, 3)
    ]
    assert found[0].evidence["loss_before"] == pytest.approx(2.307)
    assert found[0].evidence["median_update_ratio"] == pytest.approx(0.3)
    assert "learning rate is far too large" in found[0].message
    falling = [2.307, 1.9, 1.5, 1.2, 1.0]  # the same update sizes while the loss falls: a head learning fast
    quiet = GradientDiagnosis()
    assert [
        f for i, (u, loss) in enumerate(zip(updates, falling)) for f in quiet.update(record(i, [1.0] * 3, u), loss=loss)
    ] == []
    off = GradientDiagnosis(DiagnosisConfig(exploding_update_ratio=None))
    assert [
        f for i, (u, loss) in enumerate(zip(updates, rising)) for f in off.update(record(i, [1.0] * 3, u), loss=loss)
    ] == []


def test_a_resumed_diagnosis_continues_a_run_of_large_updates() -> None:
    updates, losses = [[0.02] * 3, [0.3] * 3, [0.3] * 3, [0.3] * 3], [1.0, 1.5, 1.6, 1.7]
    first = GradientDiagnosis()
    for i in range(2):
        assert first.update(record(i, [1.0] * 3, updates[i]), loss=losses[i]) == []
    resumed = GradientDiagnosis()
    resumed.load_state_dict(first.state_dict())
    found = [f for i in range(2, 4) for f in resumed.update(record(i, [1.0] * 3, updates[i]), loss=losses[i])]
    assert [(f.kind, f.step, f.reported_step) for f in found] == [("exploding", 1, 3)]


def test_clipping_on_every_step_is_a_note_and_clipping_that_hides_a_blow_up_a_warning() -> None:
    diagnosis = GradientDiagnosis(gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    found: list[Finding] = []
    for step in range(6):
        found += diagnosis.update(record(step, [20.0, 20.0, 20.0]))  # steady, 35x the clip value
    assert [(f.kind, f.severity) for f in found] == [("exploding", "note")]
    note = found[0]
    assert note.layer == "__global__" and note.step == 0 and note.reported_step == 2
    assert note.evidence["clip_ratio"] == pytest.approx(math.sqrt(3) * 20)
    assert note.evidence["rules"] == ["clipping_active"] and "learning-rate cut" in note.cause
    for step, scale in zip(range(6, 9), (1, 300, 400)):  # now the pre-clip norm blows up and stays up
        found += diagnosis.update(record(step, [20.0, 20.0 * scale, 20.0]))
    (warning,) = [f for f in found if f.severity == "warning"]
    assert (warning.kind, warning.layer, warning.step, warning.reported_step) == ("exploding", "l1", 7, 8)
    assert "clipping_hides_growth" in warning.evidence["rules"] and warning.evidence["clip_ratio"] > 1000


def test_value_clipping_compares_the_largest_element_with_the_clip_value() -> None:
    diagnosis = GradientDiagnosis(gradient_clip_val=0.5, gradient_clip_algorithm="value")
    found: list[Finding] = []
    for step in range(4):  # global L2 35 (69x the clip value) but the largest element only 8x: no finding
        found += diagnosis.update(record(step, [20.0, 20.0, 20.0], global_grad_max_abs=4.0))
    assert found == []
    for step in range(4, 8):
        found += diagnosis.update(record(step, [20.0, 20.0, 20.0], global_grad_max_abs=6.0))  # 12x
    assert [(f.kind, f.layer, f.step, f.reported_step, f.severity) for f in found] == [
        ("exploding", "__global__", 4, 6, "note")
    ]
    assert found[0].evidence["clip_ratio"] == pytest.approx(12.0)
    assert found[0].evidence["clip_algorithm"] == "value"
    assert "largest gradient element is 12.0x the clip value 0.5" in found[0].message


@pytest.mark.parametrize(("algorithm", "metric"), [("norm", "global_grad_l2"), ("value", "global_grad_max_abs")])
def test_trainer_gradient_clipping_is_read_from_the_trainer(tmp_path: Path, algorithm: str, metric: str) -> None:
    torch.manual_seed(0)
    model = Regressor(mlp(3, act=nn.ReLU, he=True), lr=1e-4)
    clip = {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": algorithm}
    fit(model, tmp_path, steps=4, trainer_kwargs=clip, on_anomaly="ignore")
    (row,) = load_findings(tmp_path).itertuples()
    assert (row.kind, row.layer, row.step, row.reported_step) == ("exploding", "__global__", 0, 2)
    assert row.evidence["clip_value"] == 1e-3 and row.evidence["clip_algorithm"] == algorithm
    history = load_history(tmp_path, metrics=[metric])
    pre_clip = float(history[history.step == 2].value.iloc[0])  # the monitor reads gradients before clipping
    assert row.evidence["clip_ratio"] == pytest.approx(pre_clip / 1e-3)
    assert row.evidence["clip_ratio"] > 10 and "pre-clip" in row.message


def test_global_norm_above_exploding_norm_is_flagged() -> None:
    steady, large = [1.0, 1.0, 1.0], [8.0, 8.0, 8.0]  # global L2 1.7, then 13.9: only 8x, below the growth rule
    assert [f for s, g in enumerate([steady, large]) for f in GradientDiagnosis().update(record(s, g))] == []
    diagnosis = GradientDiagnosis(DiagnosisConfig(exploding_norm=10.0))
    assert diagnosis.update(record(0, steady)) == []
    assert diagnosis.update(record(1, [5.0, 5.0, 5.0])) == []  # 8.7: below the threshold
    (finding,) = diagnosis.update(record(2, large))
    assert (finding.kind, finding.layer, finding.step) == ("exploding", "l0", 2)
    assert finding.evidence["exploding_norm"] == 10.0
    assert finding.evidence["global_grad_l2"] == pytest.approx(math.sqrt(3) * 8)
    assert "above exploding_norm 1.0e+01" in finding.message


def test_one_layer_above_exploding_layer_norm_is_flagged_at_that_layer() -> None:
    config = DiagnosisConfig(exploding_norm=10.0, exploding_layer_norm=5.0)
    diagnosis = GradientDiagnosis(config)
    assert diagnosis.update(record(0, [1.0, 1.0, 1.0])) == []
    assert diagnosis.update(record(1, [1.0, 4.9, 1.0])) == []  # below the per-layer threshold
    # l1 at 6 and l2 at 5.5: 6x and 5.5x growth and a global L2 of 8.2, below every other rule
    (finding,) = diagnosis.update(record(2, [1.0, 6.0, 5.5]))
    assert (finding.kind, finding.layer, finding.step, finding.layers) == ("exploding", "l1", 2, ["l1", "l2"])
    assert finding.evidence["layers_over_norm"] == {"l1": 6.0, "l2": 5.5}
    assert finding.evidence["exploding_layer_norm"] == 5.0
    assert "2 layer(s) above exploding_layer_norm 5.0e+00 (largest: l1 at 6.0e+00)" in finding.message
    assert "above exploding_norm" not in finding.message
    default = GradientDiagnosis()  # off by default
    assert [f for s, g in enumerate([[1.0, 1.0, 1.0], [1.0, 6.0, 5.5]]) for f in default.update(record(s, g))] == []


def test_a_single_batch_dip_is_not_a_blow_up() -> None:
    # global grad L2 of the textbook's sigmoid+SGD demo, steps 77-89: a nearly balanced batch at step 88 has
    # a near-zero gradient, the next batch is back at the usual scale. The old minimum-based rule read 344x.
    norms = [0.3698, 0.5708, 0.7044, 0.281, 1.016, 0.02053, 0.1631, 0.5782, 0.01636, 0.5606, 0.3962, 0.001056, 0.3628]
    assert norms[-1] / min(norms[-6:-1]) > 300
    diagnosis = GradientDiagnosis()
    found = [f for step, norm in enumerate(norms) for f in diagnosis.update(record(step, [norm / 100, norm]))]
    assert found == []


def test_steady_growth_after_a_plateau_is_flagged_within_five_steps() -> None:
    diagnosis = GradientDiagnosis()
    found: list[Finding] = []
    for step in range(10):
        found += diagnosis.update(record(step, [1.0, 1.0, 1.0]))
    for k in range(1, 8):  # x3 per logged step
        found += diagnosis.update(record(9 + k, [1.0, 3.0**k, 1.0]))
    # 3^5 = 243x the median at step 14, still there (729x) at step 15: reported then, since step 14
    assert [(f.kind, f.layer, f.step, f.reported_step) for f in found] == [("exploding", "l1", 14, 15)]
    assert found[0].evidence["window_median"] == pytest.approx(math.sqrt(3))  # from before the rise
    assert found[0].evidence["layer_growth"]["l1"] == pytest.approx(729.0)


def test_growth_within_the_window_is_flagged_at_the_growing_layer() -> None:
    diagnosis = GradientDiagnosis(DiagnosisConfig(exploding_factor=50, exploding_window=3))
    found: list[Finding] = []
    for step, scale in enumerate([1, 1, 2, 10, 200, 300]):
        found += diagnosis.update(record(step, [1.0, 1.0 * scale, 1.0]))
    assert [(f.kind, f.layer, f.step, f.reported_step) for f in found] == [("exploding", "l1", 4, 5)]


def test_a_tiny_gradient_recovering_from_zero_is_not_exploding() -> None:
    diagnosis = GradientDiagnosis()
    found = diagnosis.update(record(0, [1e-9, 1.0, 1.0]))
    found += diagnosis.update(record(1, [1e-5, 1.0, 1.0]))  # 10^4 x, but 1e-5 of the largest layer
    assert [f.kind for f in found] == []


def test_layer_windows_match_a_deque_per_layer_and_survive_a_state_round_trip() -> None:
    from collections import deque
    from statistics import median

    from gradlight.diagnosis import LayerWindows as _LayerWindows

    rng = np.random.default_rng(0)
    size, names = 4, ["a", "b", "c", "d"]
    windows, reference = _LayerWindows(size), {name: deque(maxlen=size) for name in names}
    specials = [0.0, float("nan"), float("inf"), -1.0]
    for step in range(40):
        layers = [name for name in names if name != "d" or step >= 20]  # a layer that appears later
        values = rng.lognormal(size=len(layers))
        values[rng.random(len(layers)) < 0.25] = specials[step % len(specials)]
        columns = windows.columns_of(layers)
        medians = windows.positive_medians(columns)
        for name, got in zip(layers, medians):
            positive = [v for v in reference[name] if v > 0]
            assert (math.isnan(got) and not positive) or got == median(positive)
        windows.push(columns, values)
        for name, value in zip(layers, values):
            if math.isfinite(value):
                reference[name].append(float(value))
        if step == 30:
            windows = _LayerWindows.from_lists(size, windows.to_lists())
    assert windows.to_lists() == {name: list(values) for name, values in reference.items()}


# -------------------------------------------------------------------------------------- non-finite
def test_nan_injected_into_one_layer_is_reported_at_that_step_and_layer_and_raises(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor(mlp(5, act=nn.ReLU))
    model.net[4].weight.register_hook(lambda g: g * float("nan") if model.global_step == 3 else g)
    with pytest.raises(GradientAnomalyError) as error:
        fit(model, tmp_path, steps=10, on_anomaly={"non_finite": "raise", "default": "warn"})
    (finding,) = error.value.findings
    assert (finding.kind, finding.layer, finding.step) == ("non_finite", "net.4", 3)
    assert finding.evidence["nonfinite_elements"] == 16 * 16
    assert "backward_op" in finding.evidence["rules"]
    # history flushed first (rank zero), finding on disk
    history = load_history(tmp_path)
    assert history.step.max() == 3
    assert load_findings(tmp_path).layer.tolist() == ["net.4"]


def test_nan_in_several_layers_names_the_one_closest_to_the_loss() -> None:
    diagnosis = GradientDiagnosis()
    rec = record(7, [1.0, float("nan"), float("nan"), 1.0])
    rec.metrics["grad_nonfinite"] = np.array([0.0, 3.0, 5.0, 0.0])
    (finding,) = diagnosis.update(rec, loss=1.0)
    assert (finding.kind, finding.layer, finding.step) == ("non_finite", "l2", 7)
    assert diagnosis.update(rec, loss=1.0) == []  # same episode: reported once


def test_under_a_loss_scaler_only_persistent_non_finite_gradients_are_reported() -> None:
    diagnosis = GradientDiagnosis()
    bad = record(0, [1.0, float("inf")])
    bad.metrics["grad_nonfinite"] = np.array([0.0, 4.0])
    assert diagnosis.update(bad, loss=1.0, loss_scaled=True) == []  # fp16 overflow: the scaler skips it
    assert diagnosis.update(record(1, [1.0, 1.0]), loss=1.0, loss_scaled=True) == []
    found = []
    for step in (2, 3, 4):
        bad.step = step
        found += diagnosis.update(bad, loss=1.0, loss_scaled=True)
    assert [(f.kind, f.layer, f.step, f.reported_step) for f in found] == [("non_finite", "l1", 2, 4)]


# ---------------------------------------------------------------------------------------- dormant
def test_layer_with_learning_rate_zero_is_flagged_dormant(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor(mlp(4, act=nn.ReLU, he=True), lr=0.05, lr_zero=("net.2",))
    fit(model, tmp_path, steps=7)
    findings = load_findings(tmp_path)
    assert findings[["kind", "layer", "step", "reported_step"]].values.tolist() == [["dormant", "net.2", 0, 4]]
    row = findings.iloc[0]
    assert row.evidence["update_ratio"] == 0.0 and row.evidence["loss_change"] > 0.01
    assert row.evidence["rules"] == ["learning_rate_zero"] and row.evidence["learning_rate"] == 0.0


def test_dormant_needs_the_loss_to_change() -> None:
    diagnosis = GradientDiagnosis(DiagnosisConfig(dormant_window=3))
    found = [f for s in range(5) for f in diagnosis.update(record(s, [1.0, 1.0, 1.0], [0.0, 1e-3, 1e-3]), loss=2.0)]
    assert found == []
    diagnosis = GradientDiagnosis(DiagnosisConfig(dormant_window=3))
    found = [f for s in range(5) for f in diagnosis.update(record(s, [1.0, 1.0, 1.0], [0.0, 1e-3, 1e-3]), loss=2.0 - s)]
    assert [(f.kind, f.layer, f.step, f.reported_step) for f in found] == [("dormant", "l0", 0, 2)]
    diagnosis = GradientDiagnosis(DiagnosisConfig(dormant_window=3))  # nothing moves: an LR schedule at 0
    found = [f for s in range(5) for f in diagnosis.update(record(s, [1.0, 1.0], [0.0, 0.0]), loss=2.0 - s)]
    assert found == []


def test_a_converged_run_is_not_dormant_but_a_still_section_of_a_converged_run_is() -> None:
    # Adam near convergence: every layer moves ~1e-7 and the loss, near 0, changes by 150% of its mean.
    still = [6.6e-7, 9e-7, 1.2e-6]
    losses = [1e-6 * (1 + (s % 2) * 1.5) for s in range(6)]
    diagnosis = GradientDiagnosis(DiagnosisConfig(dormant_window=3))
    found = [f for s in range(6) for f in diagnosis.update(record(s, [1e-4] * 3, still), loss=losses[s])]
    assert found == []
    diagnosis = GradientDiagnosis(DiagnosisConfig(dormant_window=3))  # one layer 100x stiller than the rest
    found = [f for s in range(6) for f in diagnosis.update(record(s, [1e-4] * 3, [1e-9, *still[1:]]), loss=losses[s])]
    assert [(f.kind, f.layer) for f in found] == [("dormant", "l0")]


# ---------------------------------------------------------------------------------------- actions
def test_stop_action_stops_the_trainer_and_flushes_the_history(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, trainer, messages = fit(Regressor(mlp(12)), tmp_path, steps=20, on_anomaly="stop")
    assert trainer.global_step == 3  # reported at step 2, stopped after that batch
    assert load_history(tmp_path).step.max() == 2
    assert any("stopping the run" in m for m in messages)


def test_ignore_records_without_warning_and_diagnose_false_records_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, _, messages = fit(Regressor(mlp(12)), tmp_path / "a", steps=4, on_anomaly="ignore")
    assert messages == [] and len(load_findings(tmp_path / "a")) == 1
    torch.manual_seed(0)
    monitor, _, messages = fit(Regressor(mlp(12)), tmp_path / "b", steps=4, diagnose=False)
    assert messages == [] and not (tmp_path / "b" / FINDINGS_FILE).exists() and monitor.recorder.findings == []


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_findings_are_counted_in_the_logger_summary(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = MemoryLogger()
    fit(Regressor(mlp(12)), tmp_path, steps=4, trainer_kwargs={"logger": logger}, on_anomaly="ignore")
    counts = {step: m["gradflow/findings"] for step, m in logger.metrics if "gradflow/findings" in m}
    assert counts == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}


# ------------------------------------------------------------------------------- resume and storage
def test_resumed_run_does_not_report_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor(mlp(12))
    monitor = GradientFlowMonitor(1, tmp_path, on_anomaly="ignore")
    trainer = L.Trainer(
        **{**QUIET, "enable_checkpointing": True}, accelerator="cpu", devices=1, max_steps=4,
        callbacks=[monitor], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["callbacks"]
    resumed = GradientFlowMonitor(1, tmp_path, on_anomaly="ignore")
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=7, callbacks=[resumed]).fit(
        Regressor(mlp(12)), ckpt_path=ckpt
    )
    recorder = resumed.recorder
    assert recorder is not None
    assert recorder.findings == [] or all(f.kind != "vanishing" for f in recorder.findings)
    assert recorder.diagnosis is not None and ("vanishing", "net.0", "warning", "") in recorder.diagnosis.reported
    assert (load_findings(tmp_path).kind == "vanishing").sum() == 1


def test_diagnosis_state_round_trips() -> None:
    first = GradientDiagnosis()
    for step in range(2):
        first.update(record(step, [1e-6, 1.0, 1.0]))
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    second = GradientDiagnosis()
    second.load_state_dict(state)
    (finding,) = second.update(record(2, [1e-6, 1.0, 1.0]))  # the streak continued across the resume
    assert (finding.kind, finding.layer, finding.step) == ("vanishing", "l0", 0)
    third = GradientDiagnosis()
    third.load_state_dict(second.state_dict())
    assert third.update(record(3, [1e-6, 1.0, 1.0])) == []


def _output_relu(step: int, dead: float, site: str = "act4") -> ActivationStats:
    """One output ReLU site (feeding no layer) with ``dead`` of its units never positive."""
    metrics = {"act_dead": np.array([dead]), "act_saturation": np.array([np.nan])}
    metrics |= {"act_mean": np.array([1.0]), "act_std": np.array([1.0])}
    return ActivationStats(step, [site], ["relu"], [None], np.array([3]), metrics)


def test_a_dead_output_unit_is_judged_from_the_first_step_across_a_resume() -> None:
    first = GradientDiagnosis()
    assert first.update(record(0, [1.0] * 3), _output_relu(0, 1 / 3)) == []
    resumed = GradientDiagnosis()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    (finding,) = resumed.update(record(1, [1.0] * 3), _output_relu(1, 1 / 3))
    assert (finding.kind, finding.layer, finding.step, finding.evidence["rules"]) == (
        "dead_units",
        "act4",
        0,
        ["dead_output_units"],
    )
    learned = GradientDiagnosis()  # alive at first, then at 0: it learned to output 0, not reported
    found = [
        f
        for step, dead in enumerate([0.0, 1 / 3, 1 / 3, 1 / 3])
        for f in learned.update(record(step, [1.0] * 3), _output_relu(step, dead))
    ]
    assert found == []
    late = GradientDiagnosis()  # a site first seen after the first tapped step feeds no *known* layer: not an output
    assert late.update(record(0, [1.0] * 3), _output_relu(0, 0.0)) == []
    assert [
        f for step in (1, 2, 3) for f in late.update(record(step, [1.0] * 3), _output_relu(step, 1 / 3, "late"))
    ] == []


def test_load_findings_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    writer = FindingsWriter(tmp_path)
    writer.append([Finding("vanishing", "a", 0, 2, "m", "c", "r", {"ratio": 1e-7}, ["a"])])
    writer.append([Finding("dormant", "b", 1, 5, "m", "c", "r")])
    with open(tmp_path / FINDINGS_FILE, "a") as sink:
        sink.write('{"kind": "exploding", "lay')
    with pytest.warns(UserWarning, match="torn last line"):
        frame = load_findings(tmp_path)
    assert frame.kind.tolist() == ["vanishing", "dormant"]
    assert {"kind", "layer", "step", "message", "cause", "remedy", "evidence"} <= set(frame.columns)
    assert frame.evidence[0] == {"ratio": 1e-7}
    with pytest.raises(FileNotFoundError, match="does not exist"):  # an empty frame would read as a healthy run
        load_findings(tmp_path / "missing")


# ------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_anomaly": "explode"}, "on_anomaly.*warn.*'explode'"),
        ({"on_anomaly": {"vanish": "warn"}}, "key 'vanish'.*vanishing"),
        ({"on_anomaly": {"non_finite": "panic"}}, r"on_anomaly\['non_finite'\].*'panic'"),
        ({"diagnose": "yes"}, "diagnose"),
        ({"track_activations": 1}, "track_activations"),
        ({"diagnosis": {"vanishing_ratio": 1e-3}}, "diagnosis"),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientFlowMonitor(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vanishing_ratio", 0.0),
        ("vanishing_patience", 0),
        ("exploding_factor", 1.0),
        ("dead_fraction", 2.0),
        ("exploding_norm", 0.0),
        ("exploding_layer_norm", -1.0),
        ("exploding_layer_norm", "5"),
        ("exploding_layer_norm", True),
    ],
)
def test_config_validates(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DiagnosisConfig(**{field: value})


def test_actions_and_rule_table() -> None:
    assert resolve_actions("stop") == dict.fromkeys(resolve_actions("warn"), "stop")
    assert resolve_actions({"dormant": "ignore"})["vanishing"] == "warn"
    assert len({rule.id for rule in RULES}) == len(RULES)


def test_model_profile() -> None:
    lstm = ModelProfile.from_model(nn.Sequential(nn.RNN(4, 4), nn.LayerNorm(4)))
    assert lstm.plain_recurrent and lstm.normalization == ["LayerNorm"] and lstm.recurrent == ["RNN"]
    tiny = nn.Linear(64, 64)
    nn.init.normal_(tiny.weight, std=1e-4)
    assert ModelProfile.from_model(nn.Sequential(tiny)).init_small == ["0"]
    default = ModelProfile.from_model(nn.Sequential(nn.Linear(64, 64), nn.Conv2d(32, 32, 3, groups=32)))
    assert default.init_small == [] and default.init_large == []  # PyTorch's default init is in range
    huge = nn.Linear(64, 64)
    nn.init.normal_(huge.weight, std=1.0)
    assert ModelProfile.from_model(nn.Sequential(huge)).init_large == ["0"]


class Bottleneck(nn.Module):
    """Named like a residual block, but its forward has no shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class SkipBlock(Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


def test_residual_structure_is_read_from_the_code_not_the_class_name() -> None:
    from transformers import GPT2Config, GPT2Model  # built from a config, no download
    from ultralytics.nn.modules.block import C3k2

    assert not ModelProfile.from_model(nn.Sequential(Bottleneck(), Bottleneck())).residual  # a name alone
    profile = ModelProfile.from_model(nn.Sequential(SkipBlock(), nn.Linear(4, 4)))
    assert profile.residual and profile.residual_evidence == ["0 (SkipBlock)"]
    gpt2 = ModelProfile.from_model(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)))
    assert gpt2.residual and any("GPT2Block" in evidence for evidence in gpt2.residual_evidence)
    # Ultralytics' flag decides: the case study's no_residual ablation switches `add` off in every Bottleneck.
    with_add, without_add = C3k2(16, 16, n=1, shortcut=True), C3k2(16, 16, n=1, shortcut=False)
    assert ModelProfile.from_model(with_add).residual
    stripped = ModelProfile.from_model(without_add)
    assert not stripped.residual
    assert stripped.block_contents["m"].endswith("no shortcut")


# --------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_stop_and_raise_under_two_process_ddp(tmp_path: Path) -> None:
    spawn(ddp_actions_worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["stop_global_step"] == 3  # vanishing reported at step 2 on both ranks, both stopped
        assert result["stop_findings"][0] == ["vanishing", "net.0", 0]
        assert result["raised"] == [["non_finite", "net.2", 3]]  # both ranks raised, same finding
        assert result["raise_global_step"] == 4  # raised after step 3's optimizer step
        assert result["warn_global_step"] == 8  # "warn" does not stop
    # same findings on both ranks; the messages may differ where they quote the rank's own loss (dormant)
    same = [{k: v for k, v in result.items() if not k.endswith("_messages")} for result in results]
    assert same[0] == same[1]
    assert load_history(tmp_path / "raise").step.max() == 3  # flushed before raising
    assert load_findings(tmp_path / "stop").kind.tolist()[0] == "vanishing"
    acts = load_history(tmp_path / "stop", metrics=["act_saturation"])
    assert set(acts.step) == {0, 1, 2}

    # warnings: rank zero only, once per kind and layer (the vanishing gradient persists for all 8 steps)
    emitted = [json.loads((tmp_path / f"warnings_rank{r}.json").read_text()) for r in range(2)]
    assert emitted[1] == {"stop": [], "raise": [], "warn": []}
    rank0, result = emitted[0], results[0]
    assert result["warn_findings"][0] == ["vanishing", "net.0", 0]
    for run in ("stop", "warn"):
        expected = [f"gradlight: {message}. Likely cause:" for message in result[f"{run}_messages"]]
        warned = [m for m in rank0[run] if not m.startswith("gradlight: stopping the run")]
        assert len(warned) == len(expected) >= 1
        assert all(m.startswith(e) for m, e in zip(warned, expected))
    assert sum("vanishing gradient: layer net.0 " in m for m in rank0["warn"]) == 1
    assert [m for m in rank0["stop"] if m.startswith("gradlight: stopping the run")] == [
        "gradlight: stopping the run at step 3 (vanishing)."
    ]
    assert rank0["raise"] == []  # non_finite raises (no warning), the rest is ignored
