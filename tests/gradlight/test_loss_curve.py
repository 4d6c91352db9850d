"""The loss curve: the engine keeps one per optimizer stream, reads it once per logged step for the three loss
detectors, checkpoints it once, and restores it from a checkpoint written when each loss detector kept a copy."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradlight import DiagnosisConfig, GradientDiagnosis, StepRecord
from gradlight.diagnosis.detectors.loss_curve import LossCurve, LossReading
from gradlight.diagnosis.detectors.vanishing import VanishingDetector

#: Written by ``GradientDiagnosis.state_dict`` at commit 61ac648 (each loss detector's state held its own copy
#: of the curve, ``"curve"``; the engine's none) after ``_feed(engine, range(RESUME))``: see ``_write_fixture``.
OLD_STATE = Path(__file__).parent / "data" / "diagnosis_state_v2_loss_curves.json"
RESUME = 12
STEPS = 30
CONFIG = DiagnosisConfig(loss_window=8, loss_initial_steps=3, loss_min_steps=14, loss_patience=2)
STREAMS = ("rising", "plateau", "oscillating")


def _loss(stream: str, step: int) -> float | None:
    """A loss that climbs from step 10, one stuck at ln 10, one jumping around its start; a step without a loss."""
    if step == 14:
        return None if stream == "rising" else math.nan
    jitter = 0.0025 * ((step * 7) % 5 - 2)
    if stream == "rising":
        return 2.3 - 0.01 * step + jitter if step < 10 else 2.2 + 0.1 * (step - 10) + jitter
    if stream == "plateau":
        return math.log(10) + jitter
    return 2.3 - (-1) ** step * (0.6 + 0.3 * ((step * 3) % 4))


def _record(step: int) -> StepRecord:
    ones = np.ones(3)
    metrics = {"grad_l2": ones, "grad_max_abs": ones, "grad_nonfinite": np.zeros(3), "param_l2": ones}
    metrics["update_ratio"] = np.full(3, 1e-3)
    return StepRecord(step, ["l0", "l1", "l2"], np.arange(3), metrics, {"global_grad_l2": math.sqrt(3)})


def _feed(engine: GradientDiagnosis, steps: range) -> list[tuple[Any, ...]]:
    """Every stream steps once per step; the findings as comparable tuples (messages and evidence included)."""
    found = []
    for step in steps:
        for stream in STREAMS:
            for f in engine.update(_record(step), loss=_loss(stream, step), stream=stream):
                found.append((f.kind, f.layer, f.step, f.reported_step, f.message, json.dumps(f.evidence)))
    return found


def _write_fixture() -> None:  # run once with the code of commit 61ac648 on the path
    engine = GradientDiagnosis(CONFIG)
    _feed(engine, range(RESUME))
    OLD_STATE.write_text(json.dumps(engine.state_dict(), indent=1) + "\n")


def test_an_old_checkpoint_with_a_curve_per_loss_detector_resumes_as_if_uninterrupted() -> None:
    old = json.loads(OLD_STATE.read_text())
    loss_states = [old["detectors"][kind] for kind in ("loss_rising", "loss_oscillating", "loss_plateau")]
    assert "loss_curve" not in old and all("curve" in state for state in loss_states)  # the old layout
    uninterrupted = GradientDiagnosis(CONFIG)
    expected = _feed(uninterrupted, range(STEPS))
    assert {(kind, step) for kind, _, step, *_ in expected} == {
        ("loss_rising", 17),
        ("loss_plateau", 15),
        ("loss_oscillating", 15),
    }  # every rule reports after the resume, from evidence that spans it
    assert all(reported >= RESUME for _, _, _, reported, _, _ in expected)
    resumed = GradientDiagnosis(CONFIG)
    resumed.load_state_dict(old)
    assert _feed(resumed, range(RESUME, STEPS)) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()  # and is saved in the new layout
    fresh = GradientDiagnosis(CONFIG)  # without the old curves the initial level is lost: other findings
    fresh.load_state_dict({**old, "detectors": {k: {**v, "curve": {}} for k, v in old["detectors"].items()}})
    assert _feed(fresh, range(RESUME, STEPS)) != expected


def test_the_engine_checkpoints_one_curve_per_stream() -> None:
    first = GradientDiagnosis(CONFIG)
    before = _feed(first, range(RESUME))
    state = json.loads(json.dumps(first.state_dict()))
    assert not any("curve" in entry for entry in state["detectors"].values())
    assert set(state["stream_loss_curves"]) == {"plateau", "oscillating"}  # "rising" is the first stream's
    assert state["loss_curve"]["window"] == [_loss("rising", step) for step in range(4, RESUME)]
    assert state["stream_loss_curves"]["plateau"]["initial"] == [_loss("plateau", step) for step in range(3)]
    resumed = GradientDiagnosis(CONFIG)
    resumed.load_state_dict(state)
    assert before + _feed(resumed, range(RESUME, STEPS)) == _feed(GradientDiagnosis(CONFIG), range(STEPS))


def test_each_logged_step_reads_the_curve_once_for_the_three_loss_detectors(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[LossReading | None] = []
    read = LossCurve.read

    def counted(curve: LossCurve) -> LossReading | None:
        reads.append(read(curve))
        return reads[-1]

    monkeypatch.setattr(LossCurve, "read", counted)
    engine = GradientDiagnosis(CONFIG)
    found = [f.kind for step in range(20) for f in engine.update(_record(step), loss=_loss("rising", step))]
    assert len(reads) == 19 and found == ["loss_rising"]  # one read per step with a loss (step 14 had none)
    quiet = GradientDiagnosis(CONFIG, detectors=[VanishingDetector])  # no loss detector: no curve kept
    for step in range(20):
        quiet.update(_record(step), loss=_loss("rising", step))
    assert len(reads) == 19 and not quiet.loss_curve.window
    off = GradientDiagnosis(DiagnosisConfig(loss_window=None))  # the loss rules turned off
    for step in range(20):
        off.update(_record(step), loss=_loss("rising", step))
    assert len(reads) == 19


def test_two_engines_in_one_process_keep_their_own_curves() -> None:
    expected = {}
    for stream in STREAMS:  # one engine per loss, each run alone
        alone = GradientDiagnosis(CONFIG)
        expected[stream] = [f.kind for t in range(STEPS) for f in alone.update(_record(t), loss=_loss(stream, t))]
    together = {stream: GradientDiagnosis(CONFIG) for stream in STREAMS}
    found: dict[str, list[str]] = {stream: [] for stream in STREAMS}
    for step in range(STEPS):  # the same step in every engine, one after the other
        for stream, engine in together.items():
            found[stream] += [f.kind for f in engine.update(_record(step), loss=_loss(stream, step))]
    assert found == expected and expected == {s: [f"loss_{s}"] for s in STREAMS}
