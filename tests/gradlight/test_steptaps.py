"""The step taps alone: started on a step, stopped, finalized into that step's statistics; no recorder."""

from __future__ import annotations

import torch
from torch import nn

from gradlight.steptaps import StepTaps
from gradlight.tracker import GradientFlowTracker


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _step(model: nn.Module) -> None:
    model(torch.randn(16, 4)).pow(2).mean().backward()


def test_the_taps_of_a_started_step_give_its_activations_and_signal() -> None:
    model = _model()
    layer_map = GradientFlowTracker(model).layer_map
    taps = StepTaps(model, activations=True, backward_signal=True)
    taps.start(3)
    _step(model)
    taps.stop()
    acts, signal, _ = taps.finalize(3, layer_map)
    assert acts is not None and acts.step == 3 and acts.sites == ["1", "3"]
    assert [(site.name, site.kind) for site in taps.activation_sites] == [("1", "tanh"), ("3", "relu")]
    assert signal is not None and signal.step == 3 and len(signal.blocks) > 0
    assert taps.finalize(3, layer_map) == (None, None, None)  # each step is finalized once


def test_a_step_that_was_not_started_gives_nothing_and_taps_nothing() -> None:
    model = _model()
    taps = StepTaps(model, activations=True, backward_signal=True)
    _step(model)
    assert taps.activations is None and taps.signal is None  # built at the first started step only
    taps.start(0)
    _step(model)
    taps.stop()
    assert taps.finalize(1, GradientFlowTracker(model).layer_map) == (None, None, None)


def test_pause_stops_the_activation_taps_until_the_next_start() -> None:
    model = _model()
    taps = StepTaps(model, activations=True, backward_signal=False)
    taps.start(0)
    _step(model)
    assert taps.activations is not None
    calls = taps.activations.calls
    taps.pause()
    _step(model)  # a validation pass
    assert taps.activations.calls == calls
    taps.start(0)
    _step(model)
    assert taps.activations.calls > calls
    taps.discard()
    assert not taps.activations.active
