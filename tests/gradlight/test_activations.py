"""Activation taps: sites, shared instances, in-place activations, logged steps only, findings, DDP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlight import ActivationTaps, GradientFlowMonitor, load_findings, load_history
from gradlight.activations import ACTIVATIONS, activation_kind, create_activation
from tests.gradlight._ddp_diag_workers import QUIET, Regressor, mlp


class Conv(nn.Module):
    """Like Ultralytics' Conv: ONE activation instance, a class attribute, shared by every Conv."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Block(nn.Module):
    """Calls the same ReLU three times, like torchvision's Bottleneck; in-place like torchvision's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.fc1(x))
        out = self.relu(self.fc2(out))
        return self.relu(out + x)


def test_shared_activation_instance_gives_one_site_per_owner() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv(3, 4), Conv(4, 8), Conv(8, 8))
    assert model[0].act is model[2].act
    taps = ActivationTaps(model)
    x = torch.randn(2, 3, 6, 6)
    taps.start()
    model(x)
    taps.stop()
    stats = taps.finalize(step=0)
    assert stats is not None
    assert stats.sites == ["0.act", "1.act", "2.act"]
    assert [site.feeds for site in taps.sites] == ["1.conv", "2.conv", None]
    with torch.no_grad():  # each owner's statistics are its own output's
        out0 = model[0](x)
        out1 = model[1](out0)
    np.testing.assert_allclose(stats.metrics["act_mean"][:2], [out0.mean(), out1.mean()], rtol=1e-5)
    expected_std = [out0.std(unbiased=False), out1.std(unbiased=False)]
    np.testing.assert_allclose(stats.metrics["act_std"][:2], expected_std, rtol=1e-4)
    assert np.isnan(stats.metrics["act_saturation"]).all() and np.isnan(stats.metrics["act_dead"]).all()
    assert not taps.active and all(not m._forward_hooks for m in model.modules())


def test_inplace_relu_called_three_times_gives_three_sites_and_unchanged_gradients() -> None:
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(16, 8)
    block(x).sum().backward()
    expected = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    taps = ActivationTaps(block)
    taps.start()
    out = block(x)
    out.sum().backward()
    taps.stop()
    for param, grad in zip(block.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)
    stats = taps.finalize(step=0)
    assert stats is not None
    assert stats.sites == ["relu", "relu#1", "relu#2"]
    assert [site.feeds for site in taps.sites] == ["fc2", None, None]
    dead = (out == 0).all(0).float().mean().item()
    assert stats.value("act_dead", "relu#2") == pytest.approx(dead)
    assert stats.value("act_mean", "relu#2") == pytest.approx(out.mean().item(), rel=1e-5)


def test_dead_units_are_units_zero_on_the_whole_batch() -> None:
    layer = nn.Linear(4, 10)
    with torch.no_grad():
        layer.bias[:6] = -100.0  # six of ten units can never fire
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(10, 1))
    taps = ActivationTaps(model)
    taps.start()
    model(torch.randn(32, 4))
    model(torch.randn(32, 4))  # a second micro-batch accumulates
    taps.stop()
    stats = taps.finalize(step=0)
    assert stats is not None and stats.value("act_dead", "1") == pytest.approx(0.6)


def test_saturation_counts_flat_sigmoid_outputs() -> None:
    model = nn.Sequential(nn.Identity(), nn.Sigmoid())
    taps = ActivationTaps(model, saturation_derivative=0.05)
    taps.start()
    model(torch.tensor([[-10.0, -1.0, 0.0, 1.0, 10.0, 6.0, -6.0, 0.5]]))
    taps.stop()
    stats = taps.finalize(step=0)
    assert stats is not None and stats.value("act_saturation", "1") == pytest.approx(4 / 8)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=4)


def test_every_registered_name_creates_a_fresh_module_of_that_kind() -> None:
    assert {"sigmoid", "tanh", "relu", "leaky_relu", "silu", "gelu"} <= set(ACTIVATIONS)
    for name in ACTIVATIONS:
        module = create_activation(name)
        assert activation_kind(module) == name  # the registry and the taps' kinds are one table
        assert module is not create_activation(name)
        assert not getattr(module, "inplace", False)
    assert create_activation("leaky_relu", negative_slope=0.2).negative_slope == 0.2
    with pytest.raises(ValueError, match=r"'swish'.*'silu'"):
        create_activation("swish")


def test_statistics_of_two_micro_batches_add_up_to_those_of_their_union() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    first, second = torch.randn(8, 4) * 3, torch.randn(5, 4) * 3
    taps = ActivationTaps(model, saturation_derivative=0.05)
    taps.start()
    model(first)
    model(second)
    taps.stop()
    stats = taps.finalize(step=0)
    assert stats is not None
    with torch.no_grad():
        outputs = torch.tanh(model[0](torch.cat([first, second])))
    assert stats.value("act_mean", "1") == pytest.approx(outputs.mean().item(), rel=1e-6)
    assert stats.value("act_std", "1") == pytest.approx(outputs.std(unbiased=False).item(), rel=1e-5)
    saturated = (1 - outputs.square() < 0.05).float().mean().item()  # tanh' = 1 - tanh^2 below 5% of its peak
    assert stats.value("act_saturation", "1") == pytest.approx(saturated)
    after_reset = taps.finalize(step=1)  # the sums were consumed: a site that did not run has no statistics
    assert after_reset is not None and np.isnan(after_reset.value("act_mean", "1"))


def test_taps_only_run_on_logged_steps_including_accumulated_micro_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(Block(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)))
    monitor = GradientFlowMonitor(3, tmp_path, track_activations=True, diagnose=False)
    seen_hooks: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            seen_hooks.append(sum(len(m._forward_hooks) for m in model.modules()))

    trainer = L.Trainer(
        **QUIET, accelerator="cpu", devices=1, max_steps=7, accumulate_grad_batches=2,
        callbacks=[monitor, Probe()],
    )  # fmt: skip
    trainer.fit(model)
    assert monitor.recorder.taps is not None
    # logged steps 0, 3, 6; two micro-batches each; four calls per forward (relu x3, tanh)
    assert monitor.recorder.taps.calls == 3 * 2 * 4
    assert seen_hooks.count(0) == len(seen_hooks) - 3  # hooks live only until the logged step's capture
    history = load_history(tmp_path, metrics=["act_mean", "act_dead", "act_saturation", "act_std"])
    assert sorted(set(history.step)) == [0, 3, 6]
    sites = history[history.step == 0].drop_duplicates("layer").set_index("layer")["depth"].to_dict()
    depth = {name: i for i, name in enumerate(monitor.recorder.tracker.layer_map.layers)}  # type: ignore[union-attr]
    assert sites == {"net.0.relu": depth["net.0.fc2"], "net.0.relu#1": depth["net.1"],
                     "net.0.relu#2": depth["net.1"], "net.2": depth["net.3"]}  # fmt: skip
    run = json.loads((tmp_path / "run.json").read_text())
    assert {s["name"] for s in run["activation_sites"]} == set(sites)


def test_validation_in_the_middle_of_an_accumulated_logged_step_is_not_tapped(tmp_path: Path) -> None:
    torch.manual_seed(0)

    class WithVal(Classifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.net(batch[0])

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(8, 8), torch.randn(8, 1)), batch_size=4)

    model = WithVal(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)))
    monitor = GradientFlowMonitor(2, tmp_path, track_activations=True, diagnose=False)
    trainer = L.Trainer(
        **QUIET, accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=3, val_check_interval=2,
        num_sanity_val_steps=0, limit_val_batches=2, callbacks=[monitor],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert monitor.recorder.taps is not None
    assert monitor.recorder.taps.calls == 2 * 3  # logged steps 0 and 2, three training micro-batches each


def test_layers_built_in_configure_model_are_profiled_and_tapped(tmp_path: Path) -> None:
    class Lazy(Classifier):
        def __init__(self) -> None:
            super().__init__(nn.Identity())

        def configure_model(self) -> None:
            self.net = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))

    monitor = GradientFlowMonitor(1, tmp_path, track_activations=True)
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=1, callbacks=[monitor]).fit(Lazy())
    assert monitor.recorder.taps is not None and [site.name for site in monitor.recorder.taps.sites] == ["net.1"]
    assert monitor.recorder.diagnosis is not None and monitor.recorder.diagnosis.profile.saturating == ["sigmoid"]


def fit(model: L.LightningModule, save_dir: Path, steps: int, **kwargs: Any) -> GradientFlowMonitor:
    monitor = GradientFlowMonitor(1, save_dir, track_activations=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=steps, callbacks=[monitor]).fit(model)
    return monitor


def test_relu_net_with_large_negative_bias_is_flagged_dead_units(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = mlp(4, act=nn.ReLU, he=True)
    with torch.no_grad():
        net[2].bias.fill_(-20.0)  # the second ReLU (net.3) never fires
    fit(Regressor(net), tmp_path, steps=4)
    findings = load_findings(tmp_path)
    dead = findings[findings.kind == "dead_units"]
    assert dead[["layer", "step", "reported_step"]].values.tolist() == [["net.3", 0, 1]]
    row = dead.iloc[0]
    assert row.evidence["fraction"] == 1.0 and row.evidence["feeds"] == "net.4"
    assert "LeakyReLU" in row.remedy


def test_saturated_sigmoid_is_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = mlp(6, act=nn.Sigmoid)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(30.0)  # huge init: pre-activations far in the flat region
    fit(Regressor(net), tmp_path, steps=4, on_anomaly="ignore")
    findings = load_findings(tmp_path)
    assert findings[["kind", "severity"]].values.tolist() == [["saturated", "warning"], ["saturated", "note"]]
    row = findings.iloc[0]
    assert row.step == 0 and row.reported_step == 1 and row.evidence["fraction"] > 0.5
    assert row.layer == max(row.evidence["fractions"], key=row.evidence["fractions"].get)
    assert len(row.layers) == 4 and row.evidence["feeds"] == "net.10"
    assert row.evidence["rules"][:2] == ["saturating_activation", "no_normalization"]
    assert "init_large" in row.evidence["rules"]
    # the site right after the first layer starves no other layer: a note, with that layer's gradient as evidence
    note = findings.iloc[1]
    assert note.layer == "net.1" and note.evidence["input_layer"] == "net.0"
    assert note.evidence["rules"] == ["input_layer_saturated"] and note.evidence["input_layer_ratio"] > 0.1


def test_a_saturated_output_sigmoid_is_not_a_finding() -> None:
    from gradlight import GradientDiagnosis

    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.fill_(50.0)  # confident outputs
    taps = ActivationTaps(model)
    diagnosis = GradientDiagnosis()
    found = []
    for step in range(3):
        taps.start()
        model(torch.rand(16, 4))
        taps.stop()
        stats = taps.finalize(step)
        assert stats is not None and stats.value("act_saturation", "3") == 1.0 and stats.feeds[1] is None
        found += [f for f in diagnosis.update(_flat_record(step), stats) if f.kind == "saturated"]
    assert found == []


def _flat_record(step: int) -> Any:
    from gradlight import StepRecord

    metrics = {"grad_l2": np.ones(2), "grad_nonfinite": np.zeros(2), "update_ratio": np.full(2, 1e-3)}
    return StepRecord(step, ["0", "2"], np.arange(2), metrics, {})


def test_vanishing_finding_cites_the_saturating_activations_on_the_gradient_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit(Regressor(mlp(12)), tmp_path, steps=3, on_anomaly="ignore")
    (row,) = load_findings(tmp_path).itertuples()
    assert (row.kind, row.layer, row.step) == ("vanishing", "net.0", 0)
    assert "11 saturating activation site(s) (sigmoid)" in row.message
    assert row.evidence["saturating_downstream"] == ["sigmoid"]
    assert 0 <= row.evidence["downstream_saturation_mean"] <= row.evidence["downstream_saturation_max"] <= 1


def test_vanishing_finding_cites_the_saturation_of_the_site_feeding_it() -> None:
    from gradlight import ActivationStats, GradientDiagnosis, StepRecord

    layers = ["a", "b", "c", "d"]
    grad = np.array([1.0, 1e-7, 1.0, 1.0])
    metrics = {"grad_l2": grad, "grad_nonfinite": np.zeros(4), "update_ratio": np.full(4, 1e-3)}
    acts = ActivationStats(
        0, ["s"], ["sigmoid"], ["b"], np.array([1]),
        {"act_saturation": np.array([0.96]), "act_dead": np.array([np.nan]),
         "act_mean": np.array([0.5]), "act_std": np.array([0.4])},
    )  # fmt: skip
    diagnosis = GradientDiagnosis()
    found = []
    for step in range(3):
        acts.step = step
        found += diagnosis.update(StepRecord(step, layers, np.arange(4), metrics, {}), acts)
    vanishing = [f for f in found if f.kind == "vanishing"]
    assert vanishing[0].layer == "b"
    assert "1.0e-07 of the reference gradient" in vanishing[0].message
    assert "96% of the sigmoid outputs feeding it (s) are saturated" in vanishing[0].message


@pytest.mark.slow
def test_activation_statistics_are_reduced_exactly_under_ddp(tmp_path: Path) -> None:
    from tests.gradlight._ddp_diag_workers import ddp_actions_worker, spawn

    spawn(ddp_actions_worker, 2, str(tmp_path))  # 2 ranks x 16 rows = the single run's 32-row batches
    torch.manual_seed(0)
    fit(Regressor(mlp(12), batch_size=32), tmp_path / "single", steps=3, diagnose=False)
    metrics = ["act_saturation", "act_mean", "act_std"]
    single = load_history(tmp_path / "single", metrics=metrics)
    ddp = load_history(tmp_path / "stop", metrics=metrics)
    merged = single.merge(ddp, on=["step", "layer", "metric"], suffixes=("_single", "_ddp"))
    assert len(merged) == len(single) == 3 * 11 * 3
    np.testing.assert_allclose(merged.value_ddp, merged.value_single, rtol=1e-5, atol=1e-7)
