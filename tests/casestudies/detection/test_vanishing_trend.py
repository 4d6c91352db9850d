"""The diagnosis on a real BatchNorm-free YOLO: a vanishing that develops from a balanced start is a warning.

Issue 25, part 4: ``no_bn`` starved its first block (8.7 at step 0, 0.03 by step 112, the Detect head at
100-300) and got no finding: the trend rule compared only the two ends of a 10-logged-step window, and the
early-to-late ratio fell less than a decade per window. The fixture ``data/no_bn_norms.json`` holds the
per-block ``grad_l2`` of a real ``no_bn`` and a real ``intact`` yolo11n run (first two and last two blocks, every
second step; how it was made is in ``data/make_no_bn_norms.py``). ``data/no_bn_warmup_norms.json`` holds the same
blocks of the default preset's ``no_bn`` and ``intact`` under one recipe, Ultralytics' warm-up (bias learning
rate from 0.1): there the first block's share collapses within the first update, inside the rule's first level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gradlight import GradientDiagnosis, ModelProfile, StepRecord
from gradlight.diagnosis import Finding
from gradlight.tracker import early_late_ratio

FIXTURE = Path(__file__).parent / "data" / "no_bn_norms.json"
WARMUP_FIXTURE = Path(__file__).parent / "data" / "no_bn_warmup_norms.json"


@pytest.fixture(scope="module")
def norms() -> dict[str, Any]:
    return dict(json.loads(FIXTURE.read_text()))


@pytest.fixture(scope="module")
def warmup_norms() -> dict[str, Any]:
    return dict(json.loads(WARMUP_FIXTURE.read_text()))


def diagnose(layers: list[str], sizes: list[int], steps: list[int], grad_l2: np.ndarray) -> list[Finding]:
    """Replay a recorded history through the default diagnosis, as the monitor feeds it."""
    diagnosis = GradientDiagnosis(profile=ModelProfile(layer_sizes=dict(zip(layers, sizes, strict=True))))
    found: list[Finding] = []
    for step, values in zip(steps, grad_l2, strict=True):
        ratio = early_late_ratio(values)
        record = StepRecord(step, layers, np.arange(len(layers)), {"grad_l2": values}, {"early_late_ratio": ratio})
        found += diagnosis.update(record)
    return found


def run(norms: dict[str, Any], variant: str) -> tuple[list[int], list[int], np.ndarray]:
    entry = norms["runs"][variant]
    return entry["num_params"], entry["steps"], np.asarray(entry["grad_l2"], dtype=np.float64)


def warnings_of(found: list[Finding]) -> list[Finding]:
    return [f for f in found if f.kind == "vanishing" and f.is_warning]


def test_the_fixture_has_the_no_bn_shape(norms: dict[str, Any]) -> None:
    """About one decade below balanced at the start, more than three and a half at the end (medians)."""
    _, _, grad = run(norms, "no_bn")
    decades = np.log10([early_late_ratio(row) for row in grad])
    assert -1.5 < np.median(decades[:3]) < 0.0
    assert np.median(decades[-10:]) < -3.5
    # no single window of 10 logged steps falls 2 decades (first vs last third): the old rule saw nothing
    windows = [np.median(decades[i : i + 3]) - np.median(decades[i + 7 : i + 10]) for i in range(len(decades) - 9)]
    assert max(windows) < 2.0


def test_a_vanishing_that_develops_from_a_balanced_start_is_a_warning(norms: dict[str, Any]) -> None:
    sizes, steps, grad = run(norms, "no_bn")
    found = warnings_of(diagnose(norms["layers"], sizes, steps, grad))
    assert [f.layer for f in found] == ["model.model.0"]  # the first block, once
    finding = found[0]
    assert finding.step == 0 and finding.reported_step < steps[-1] // 2  # onset at the start, seen early
    assert finding.evidence["since_start"] is True
    assert finding.evidence["trend_decades"] >= 2.0
    assert finding.evidence["early_late_ratio_after"] < 1e-2 * min(finding.evidence["early_late_ratio_before"], 1.0)
    assert "since the start of the run" in finding.message and "model.model.0" in finding.message


def test_the_intact_run_with_batchnorm_gets_no_warning(norms: dict[str, Any]) -> None:
    sizes, steps, grad = run(norms, "intact")
    assert warnings_of(diagnose(norms["layers"], sizes, steps, grad)) == []


def test_the_same_noise_without_the_decline_gets_no_warning(norms: dict[str, Any]) -> None:
    """``no_bn`` with the early blocks lifted by the ratio's decline (its running median): the early/late ratio
    then holds its starting level, with the run's own step-to-step noise, while the head grows as it did."""
    sizes, steps, grad = run(norms, "no_bn")
    decades = pd.Series(np.log10([early_late_ratio(row) for row in grad]))
    decline = decades.rolling(9, center=True, min_periods=1).median()
    lift = float(decades.iloc[:3].median()) - decline.to_numpy()
    healthy = grad.copy()
    healthy[:, :2] *= 10.0 ** lift[:, None]
    flat = np.log10([early_late_ratio(row) for row in healthy])
    assert np.allclose(flat - decades.to_numpy(), lift)  # only the trend moved
    assert (decades - decline).std() > 0.1  # real noise is left: a tenth of a decade or more per step
    assert abs(np.median(flat[-10:]) - np.median(flat[:3])) < 0.5
    assert warnings_of(diagnose(norms["layers"], sizes, steps, healthy)) == []


def test_a_ratio_that_falls_from_too_large_to_balanced_is_no_trend() -> None:
    """Started 3 decades above (a first layer far ahead of the head), ends 1.5 below: a recovery plus noise."""
    layers = ["first", "middle", "last"]
    diagnosis = GradientDiagnosis()
    found: list[Finding] = []
    for step, decades in enumerate(np.linspace(3.0, -1.5, 60)):
        values = np.array([10.0**decades, 1.0, 1.0])
        record = StepRecord(step, layers, np.arange(3), {"grad_l2": values}, {"early_late_ratio": 10.0**decades})
        found += diagnosis.update(record)
    assert warnings_of(found) == []
    assert math.isclose(early_late_ratio(np.array([1e-3, 1.0, 1.0])), 1e-3)


def test_the_warmup_fixture_collapses_within_the_first_update(warmup_norms: dict[str, Any]) -> None:
    """One decade below balanced at step 0, more than three below at step 2 and after: the first level of the
    run (the median of logged steps 0, 2, 4) is already collapsed, so a fall measured from it is small."""
    _, steps, grad = run(warmup_norms, "no_bn")
    decades = np.log10([early_late_ratio(row) for row in grad])
    assert steps[:2] == [0, 2]
    assert -1.5 < decades[0] < 0.0
    assert decades[1] < decades[0] - 3.0 and np.median(decades[:3]) < -4.0
    assert np.median(decades[:3]) - np.median(decades[-10:]) < 2.0  # the anchor of a slow decline sees < 2


def test_a_vanishing_from_the_first_update_is_measured_from_step_0(warmup_norms: dict[str, Any]) -> None:
    sizes, steps, grad = run(warmup_norms, "no_bn")
    found = [f for f in warnings_of(diagnose(warmup_norms["layers"], sizes, steps, grad)) if f.step == 0]
    assert [f.layer for f in found] == ["model.model.0"]
    evidence = found[0].evidence
    assert evidence["since_start"] is True and evidence["window_steps"][0] == 0
    assert math.isclose(evidence["early_late_ratio_before"], early_late_ratio(grad[0]), rel_tol=1e-9)
    assert evidence["trend_decades"] >= 3.0
    assert "at step 0, before any update" in found[0].message


def test_the_intact_run_under_the_same_warmup_gets_no_warning(warmup_norms: dict[str, Any]) -> None:
    sizes, steps, grad = run(warmup_norms, "intact")
    assert warnings_of(diagnose(warmup_norms["layers"], sizes, steps, grad)) == []


@pytest.mark.parametrize("older_state", [False, True])
def test_the_step_0_anchor_survives_a_resume(warmup_norms: dict[str, Any], older_state: bool) -> None:
    """Resumed after 5 logged steps (before the window fills), the rule still measures from step 0; a state
    saved by a version without the anchor carries no step 0, and the resumed rule does not invent one."""
    sizes, steps, grad = run(warmup_norms, "no_bn")
    layers = warmup_norms["layers"]
    profile = ModelProfile(layer_sizes=dict(zip(layers, sizes, strict=True)))
    first = GradientDiagnosis(profile=profile)
    records = [
        StepRecord(step, layers, np.arange(4), {"grad_l2": values}, {"early_late_ratio": early_late_ratio(values)})
        for step, values in zip(steps, grad, strict=True)
    ]
    for record in records[:5]:
        first.update(record)
    state = first.state_dict()
    if older_state:
        del state["detectors"]["vanishing"]["trend_initial"]
    resumed = GradientDiagnosis(profile=profile)
    resumed.load_state_dict(state)
    found = [f for record in records[5:] for f in resumed.update(record)]
    from_step_0 = [f for f in warnings_of(found) if f.layer == "model.model.0" and f.step == 0]
    assert len(from_step_0) == (0 if older_state else 1)
