"""The vanishing trend is judged against the ratio's own noise: a batch of one sample is not a trend.

AUTOTRAINER's Blob program trained with a batch of one (``AUTOTRAINER/blob/simplednn_batch1``, ported in
``benchmarks/buggy``; its fault is an oscillating loss, not a vanishing gradient) gives an early-to-late ratio
that swings by decades from one sample to the next: most steps agree, some land four decades lower. Medians of
three such steps fell two decades between steps 179 and 188, and the rule reported ``vanishing@dense0``; judged
against the window's step-to-step noise the fall is not significant. The same program with its batch of 32
(its twin) was always quiet.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.buggy import programs, runner
from gradlight.diagnosis.detectors.vanishing import _level_error, _step_noise


@pytest.mark.slow
def test_single_sample_noise_in_the_ratio_is_not_reported_as_vanishing() -> None:
    torch.set_num_threads(1)
    (program,) = [p for p in programs.PROGRAMS if p.name == "AUTOTRAINER/blob/simplednn_batch1"]
    observer = runner.GradlightObserver()
    runner.train(program.build(), observer)
    trend = next(d for d in observer.recorder.diagnosis.detectors if d.kind == "vanishing").trend
    values = [value for _, value in trend]
    assert max(values) - min(values) > 3.0  # the noise is there: decades within one window
    assert [f for f in observer.recorder.findings if f.kind == "vanishing" and f.is_warning] == []


def test_the_noise_of_a_steady_fall_is_zero_and_a_jump_counts_in_full() -> None:
    assert _step_noise([0.0, -0.5, -1.0, -1.5, -2.0]) == 0.0
    one_jump = _step_noise([0.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0])
    assert one_jump > 1.0  # a median-based estimate would read 0 here
    assert math.isclose(_level_error(1.0, 1), 1.0) and _level_error(1.0, 3) < 1.0
