"""Where a non-finite value is born (forward-origin taps), dead units judged from the mechanism, and preflight.

Real models: torchvision's ResNet-18 and ``torchvision.ops.MLP``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops import MLP

from gradlight import DiagnosisConfig, Finding, GradientFlowRecorder, preflight
from gradlight.activations import ActivationTaps, ForwardOriginTaps


def _resnet_run(poison_step: int, steps: int, module: str, log_every: int = 1) -> tuple[list[Finding], list[int]]:
    """ResNet-18 whose ``module`` returns NaN on ``poison_step``; the forward hooks alive at each step's end."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=log_every, warn=lambda message: None)
    state = {"step": -1}

    def poison(mod: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan") if state["step"] == poison_step else output

    model.get_submodule(module).register_forward_hook(poison)
    found: list[Finding] = []
    hooks: list[int] = []
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        state["step"] = step
        recorder.start_step(step)
        x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        found += recorder.end_step(loss)
        optimizer.zero_grad()
        hooks.append(sum(len(m._forward_hooks) for m in model.modules()) - 1)  # minus the poison hook
    recorder.close()
    return found, hooks


def test_the_non_finite_finding_names_the_module_whose_forward_output_was_made_nan() -> None:
    found, _ = _resnet_run(poison_step=2, steps=4, module="layer2.0.conv2")
    nonfinite = [f for f in found if f.kind == "non_finite"]
    assert len(nonfinite) == 1
    finding = nonfinite[0]
    assert finding.step == 2
    assert finding.evidence["forward_origin"] == "layer2.0.conv2"  # not conv1, not the layer closest to the loss
    assert finding.evidence["forward_nonfinite"][:2] == ["layer2.0.conv2", "layer2.0.bn2"]
    assert finding.evidence["rules"][0] == "forward_origin"
    assert "layer2.0.conv2" in finding.message and "layer2.0.conv2" in finding.cause


def test_the_forward_origin_taps_run_on_logged_steps_only() -> None:
    _, hooks = _resnet_run(poison_step=-1, steps=4, module="fc", log_every=2)
    assert hooks == [0, 0, 0, 0]  # removed at each logged step's capture, never installed on unlogged steps


def test_a_nan_born_in_backward_says_the_forward_was_finite() -> None:
    torch.manual_seed(0)
    model = MLP(4, [8, 1])
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, warn=lambda message: None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.start_step(0)
    out = model(torch.randn(8, 4))
    (out.abs() - out.abs()).sqrt().sum().backward()  # sqrt(0): a finite forward, an infinite derivative
    recorder.capture(0, optimizer)
    optimizer.step()
    found = recorder.end_step(0.0)
    recorder.close()
    finding = next(f for f in found if f.kind == "non_finite")
    assert finding.evidence["forward_finite"] is True and "born in backward" in finding.message
    assert "forward_origin" not in finding.evidence["rules"]


def test_forward_origin_taps_list_the_modules_in_the_order_they_returned() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 1))
    taps = ForwardOriginTaps(model)
    taps.start()
    with torch.no_grad():
        model[1][0].weight[0, 0] = float("inf")
        model(torch.randn(2, 4))
    taps.stop()
    assert taps.finalize() == ["1.0", "1.1", "1", "2"]  # the inner linear first, its parent after its children
    assert taps.finalize() == []  # consumed


# ------------------------------------------------------------------------------------------------ dead units
def _mlp_dead_units(batch: int, steps: int, poison_step: int | None = None) -> tuple[list[Finding], MLP]:
    """``torchvision.ops.MLP`` with ReLU, trained with activation taps on every step."""
    torch.manual_seed(0)
    model = MLP(16, [64, 64, 4], activation_layer=nn.ReLU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, track_activations=True, warn=lambda m: None)
    generator = torch.Generator().manual_seed(0)
    found: list[Finding] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            recorder.start_step(step)
            x = torch.randn(batch, 16, generator=generator)
            if step == poison_step:
                x[0, 0] = float("nan")  # one bad sample in the data
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (batch,), generator=generator))
            loss.backward()
            recorder.capture(step, optimizer)
            optimizer.step()
            found += recorder.end_step(loss)
            optimizer.zero_grad()
    recorder.close()
    return found, model


def test_a_relu_mlp_trained_on_one_sample_per_batch_has_no_dead_units() -> None:
    found, model = _mlp_dead_units(batch=1, steps=40)
    taps = ActivationTaps(model)  # the probe: many inputs at once
    taps.start()
    with torch.no_grad():
        model(torch.randn(256, 16, generator=torch.Generator().manual_seed(1)))
    taps.stop()
    probe = taps.finalize(step=0)
    assert probe is not None and (probe.metrics["act_dead"] == 0).all()  # no unit is dead over 256 inputs
    assert [f.message for f in found if f.kind == "dead_units"] == []


def test_nan_activations_are_non_finite_not_dead_units() -> None:
    found, _ = _mlp_dead_units(batch=32, steps=4, poison_step=1)
    assert [f.message for f in found if f.kind == "dead_units"] == []
    nonfinite = [f for f in found if f.kind == "non_finite"]
    assert len(nonfinite) == 1 and nonfinite[0].step == 1
    assert nonfinite[0].evidence["forward_origin"] == "0"  # the first layer returns the data's NaN


def test_units_seen_on_few_inputs_are_pooled_over_logged_steps() -> None:
    layer = nn.Linear(4, 10)
    with torch.no_grad():
        layer.bias[:6] = -100.0  # six of ten units can never fire
    model = nn.Sequential(layer, nn.ReLU())
    taps = ActivationTaps(model, dead_min_samples=16)
    fractions = []
    for step in range(3):
        taps.start()
        model(torch.randn(8, 4))  # 8 inputs per unit per step: judged every second step
        taps.stop()
        stats = taps.finalize(step)
        assert stats is not None
        fractions.append(stats.value("act_dead", "1"))
    assert torch.isnan(torch.tensor(fractions[0])) and fractions[1] == 0.6 and torch.isnan(torch.tensor(fractions[2]))


# ------------------------------------------------------------------------------------------------- preflight
def test_preflight_finds_what_one_step_can_show_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.fc2 = nn.Linear(10, 10)  # built and handed to the optimizer, never called
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    report = preflight(model, batch, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), optimizer)
    assert report.checks == {"finite": True, "gradients": False, "moves": True}
    assert [f.layer for f in report.findings if f.kind == "no_gradient"] == ["fc2"]
    assert "gradients" in str(report) and "FAIL" in str(report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert optimizer.state_dict()["state"] == {}

    del model.fc2
    tiny_lr = torch.optim.SGD(model.parameters(), lr=1e-12)  # updates below float32's resolution: nothing moves
    stuck = preflight(model, batch, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), tiny_lr)
    assert stuck.checks["moves"] is False and stuck.checks["gradients"] is True


def test_preflight_names_where_a_nan_is_born() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.layer3[1].bn1.register_forward_hook(lambda m, a, out: out.log())  # log of negative values: NaN
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    report = preflight(model, batch, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), optimizer)
    assert not report.ok and report.checks["finite"] is False
    finding = next(f for f in report.findings if f.kind == "non_finite")
    assert finding.evidence["forward_origin"] == "layer3.1.bn1"


def test_preflight_rejects_bad_arguments() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, match in (({"steps": 0}, "steps"), ({"loss_fn": 3}, "loss_fn")):
        arguments: dict[str, Any] = {"loss_fn": lambda m, b: m(b).sum(), **kwargs}
        try:
            preflight(model, torch.randn(2, 2), optimizer=optimizer, **arguments)
        except ValueError as error:
            assert match in str(error)
        else:
            raise AssertionError(f"no error for {kwargs}")
    assert DiagnosisConfig(forward_origin=False).forward_origin is False
