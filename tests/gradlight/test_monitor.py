from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from gradlight import GLOBAL_LAYER, GradientFlowMonitor, GradientFlowSpec, load_history
from gradlight.stats import LocalReduction
from tests.gradlight.models import Net, ReferenceNorms

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def fit(module: L.LightningModule, callbacks: list[Any], ckpt_path: str | None = None, **kwargs: Any) -> L.Trainer:
    options = {**QUIET, "max_epochs": 1, "accelerator": "cpu", "devices": 1, **kwargs}
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def layer_values(history: pd.DataFrame, step: int, metric: str) -> dict[str, float]:
    rows = history[(history.step == step) & (history.metric == metric)]
    return dict(zip(rows.layer, rows.value))


def assert_matches_reference(history: pd.DataFrame, reference: ReferenceNorms, rel: float = 1e-6) -> None:
    assert reference.records, "the reference saw no optimizer step"
    for step, layers in reference.records.items():
        for metric in ("grad_l2", "grad_max_abs", "param_l2"):
            recorded = layer_values(history, step, metric)
            expected = {layer: values[metric] for layer, values in layers.items()}
            assert recorded.keys() == expected.keys()
            for layer, value in expected.items():
                assert recorded[layer] == pytest.approx(value, rel=rel, abs=1e-12), (step, layer, metric)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm"])
def test_norms_equal_an_independent_reference(tmp_path: Path, kind: str) -> None:
    reference = ReferenceNorms()
    monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=tmp_path)
    fit(Net(kind), [reference, monitor], max_steps=4)
    history = load_history(tmp_path)
    assert sorted(history.step.unique()) == [0, 1, 2, 3]
    assert_matches_reference(history, reference)
    assert (history[history.metric == "grad_nonfinite"].value == 0).all()


def test_update_ratio_is_the_step_over_the_weights(tmp_path: Path) -> None:
    class Snapshots(L.Callback):
        def __init__(self) -> None:
            self.before: dict[str, torch.Tensor] = {}
            self.ratio: dict[str, float] = {}

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            if trainer.global_step == 2:
                self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:
                for module_name, module in pl_module.named_modules():
                    names = [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
                    if names:
                        delta = torch.cat(
                            [(dict(pl_module.named_parameters())[n] - self.before[n]).flatten() for n in names]
                        )
                        old = torch.cat([self.before[n].flatten() for n in names])
                        self.ratio[module_name] = float(delta.detach().norm() / old.norm())

    for method in ("copy", "auto"):
        snapshots = Snapshots()
        monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=tmp_path / method, update_method=method)
        fit(Net("mlp"), [snapshots, monitor], max_steps=4)
        recorded = layer_values(load_history(tmp_path / method), 2, "update_ratio")
        assert recorded.keys() == snapshots.ratio.keys()
        for layer, value in snapshots.ratio.items():
            if method == "copy":
                assert recorded[layer] == pytest.approx(value, rel=1e-5), layer
            elif value > 1e-6:  # the computed step against the applied change: rounding differs by < 1e-3
                assert recorded[layer] == pytest.approx(value, rel=1e-3), layer
            else:  # below float32's resolution the applied change is rounded; "auto" reports the computed step
                assert 0 < recorded[layer] < 1e-5


def test_one_record_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    reference = ReferenceNorms()
    monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=tmp_path)
    # 96 samples / 8 = 12 batches, accumulated by 4: three optimizer steps.
    fit(Net("mlp", batch_size=8), [reference, monitor], accumulate_grad_batches=4)
    history = load_history(tmp_path)
    assert sorted(history.step.unique()) == [0, 1, 2]
    per_step = history[history.metric == "grad_l2"].groupby("step").size()
    assert (per_step == per_step.iloc[0]).all()
    assert_matches_reference(history, reference)


def test_logging_interval_and_no_tensor_work_between(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monitor = GradientFlowMonitor(log_every_n_steps=3, save_dir=tmp_path)

    class CountCalls(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            self.step = trainer.global_step

    counter = CountCalls()

    def counting(real: Any) -> Any:
        def count(*args: Any, **kwargs: Any) -> Any:
            calls.append(counter.step)
            return real(*args, **kwargs)

        return count

    # the norm kernels: fused over many tensors (accelerators), one tensor at a time (CPU)
    monkeypatch.setattr(torch, "_foreach_norm", counting(torch._foreach_norm))
    monkeypatch.setattr(torch.linalg, "vector_norm", counting(torch.linalg.vector_norm))
    fit(Net("mlp"), [counter, monitor], max_steps=6)
    assert sorted(load_history(tmp_path).step.unique()) == [0, 3]
    assert set(calls) == {0, 3}


def test_default_interval_and_save_dir_come_from_the_trainer(tmp_path: Path) -> None:
    monitor = GradientFlowMonitor()
    logger = CSVLogger(tmp_path)
    fit(Net("mlp"), [monitor], logger=logger, log_every_n_steps=2, max_steps=5)
    assert monitor.options.log_every_n_steps == 2
    saved = Path(logger.log_dir) / "gradlight"
    assert sorted(load_history(saved).step.unique()) == [0, 2, 4]
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert {
        "gradflow/global_grad_l2",
        "gradflow/early_late_ratio",
        "gradflow/grad_l2_min",
        "gradflow/grad_l2_max",
    } <= set(metrics.columns)
    assert not any("/grad_l2/" in column for column in metrics.columns)


def test_per_layer_logger_keys_when_asked(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    fit(Net("mlp"), [GradientFlowMonitor(1, tmp_path / "g", log_per_layer=True)], logger=logger, max_steps=2)
    columns = pd.read_csv(Path(logger.log_dir) / "metrics.csv").columns
    assert "gradflow/grad_l2/net.0" in columns and "gradflow/grad_l2/net.18" in columns


def test_global_summary_is_consistent_with_layers(tmp_path: Path) -> None:
    fit(Net("mlp"), [GradientFlowMonitor(1, tmp_path)], max_steps=2)
    history = load_history(tmp_path)
    layers = layer_values(history, 1, "grad_l2")
    summary = layer_values(history, 1, "global_grad_l2")[GLOBAL_LAYER]
    assert summary == pytest.approx(math.sqrt(sum(v * v for v in layers.values())), rel=1e-6)
    ratio = layer_values(history, 1, "early_late_ratio")[GLOBAL_LAYER]
    assert ratio == pytest.approx(layers["net.0"] / layers["net.18"], rel=1e-6)
    assert layer_values(history, 1, "grad_l2_min")[GLOBAL_LAYER] == pytest.approx(min(layers.values()))
    assert "loss" in set(history[history.layer == GLOBAL_LAYER].metric)


def test_depth_follows_forward_order_not_registration_order(tmp_path: Path) -> None:
    class Reversed(Net):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Module()
            self.net.last = nn.Linear(4, 1)  # registered first, runs last
            self.net.first = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.last(torch.tanh(self.net.first(x)))

    fit(Reversed(), [GradientFlowMonitor(1, tmp_path)], max_steps=1)
    rows = load_history(tmp_path, metrics=["grad_l2"])
    assert dict(zip(rows.layer, rows.depth)) == {"net.first": 0, "net.last": 1}


def test_group_by_int_callable_and_mixin_spec(tmp_path: Path) -> None:
    fit(Net("cnn"), [GradientFlowMonitor(1, tmp_path / "int", group_by=1)], max_steps=1)
    assert set(load_history(tmp_path / "int").layer) - {GLOBAL_LAYER} == {"net"}

    def by_kind(name: str) -> str:
        return "weights" if name.endswith("weight") else "biases"

    reference = ReferenceNorms()
    fit(Net("mlp"), [reference, GradientFlowMonitor(1, tmp_path / "fn", group_by=by_kind)], max_steps=1)
    values = layer_values(load_history(tmp_path / "fn"), 0, "grad_l2")
    expected = math.sqrt(sum(v["grad_l2"] ** 2 for v in reference.records[0].values()))
    assert math.hypot(values["weights"], values["biases"]) == pytest.approx(expected, rel=1e-6)

    class Excluding(Net):
        def configure_gradient_flow(self) -> GradientFlowSpec:
            return GradientFlowSpec(group_by=None, exclude=["net.18.*", "net.0.bias"])

    reference = ReferenceNorms()
    fit(Excluding(), [reference, GradientFlowMonitor(1, tmp_path / "spec")], max_steps=1)
    history = load_history(tmp_path / "spec")
    assert "net.18" not in set(history.layer)
    weight_only = layer_values(history, 0, "grad_l2")["net.0"]
    assert weight_only < reference.records[0]["net.0"]["grad_l2"]


def test_frozen_and_unused_parameters_are_skipped(tmp_path: Path) -> None:
    class Partial(Net):
        def __init__(self) -> None:
            super().__init__()
            self.net[0].requires_grad_(False)
            self.unused = nn.Linear(3, 3)

    fit(Partial(), [GradientFlowMonitor(1, tmp_path)], max_steps=2)
    layers = set(load_history(tmp_path).layer)
    assert "net.0" not in layers and "unused" not in layers and "net.2" in layers


def test_nan_gradients_are_recorded_without_a_crash(tmp_path: Path) -> None:
    class Poisoned(Net):
        def on_after_backward(self) -> None:
            if self.trainer.global_step == 1:
                self.net[4].weight.grad[0, :3] = float("nan")
                self.net[4].weight.grad[1, 0] = float("inf")

    fit(Poisoned(), [GradientFlowMonitor(1, tmp_path)], max_steps=3)
    history = load_history(tmp_path)
    counts = layer_values(history, 1, "grad_nonfinite")
    assert counts["net.4"] == 4
    assert all(v == 0 for layer, v in counts.items() if layer != "net.4")
    assert layer_values(history, 1, "global_grad_nonfinite")[GLOBAL_LAYER] == 4
    assert layer_values(history, 0, "grad_nonfinite")["net.4"] == 0


def test_bf16_mixed_and_bf16_weights(tmp_path: Path) -> None:
    reference = ReferenceNorms()
    fit(
        Net("cnn"),
        [reference, GradientFlowMonitor(1, tmp_path / "mixed")],
        precision="bf16-mixed",
        max_steps=2,
    )
    assert_matches_reference(load_history(tmp_path / "mixed"), reference)

    reference = ReferenceNorms()
    fit(Net("mlp"), [reference, GradientFlowMonitor(1, tmp_path / "true")], precision="bf16-true", max_steps=2)
    assert_matches_reference(load_history(tmp_path / "true"), reference, rel=1e-5)


def test_fused_optimizer_under_fp16_amp_reports_unscaled_values(tmp_path: Path) -> None:
    reference = ReferenceNorms()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module = Net("mlp", optimizer="adam_fused", lr=1e-3)
    fit(module, [reference, GradientFlowMonitor(1, tmp_path)], plugins=[plugin], max_steps=3)
    history = load_history(tmp_path)
    assert_matches_reference(history, reference, rel=1e-5)
    scale = layer_values(history, 0, "grad_scale")[GLOBAL_LAYER]
    assert scale == 2.0**10
    raw_first = reference.records[0]["net.0"]["grad_l2"]
    assert layer_values(history, 0, "grad_l2")["net.0"] == pytest.approx(raw_first, rel=1e-5)


def test_manual_optimization_records_once_per_step(tmp_path: Path) -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            optimizer = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            self.record_gradient_flow(optimizer)
            optimizer.step()
            return loss

    reference = ReferenceNorms()
    monitor = GradientFlowMonitor(1, tmp_path)
    module = Manual()
    fit(module, [reference, monitor], max_steps=3)
    history = load_history(tmp_path)
    assert sorted(history.step.unique()) == [0, 1, 2]
    assert_matches_reference(history, reference)
    assert module.gradient_flow is monitor.recorder.latest and monitor.recorder.latest.step == 2
    assert not history.duplicated(["step", "layer", "metric"]).any()


def test_mixin_without_monitor_is_a_clear_error() -> None:
    module = Net()
    trainer = L.Trainer(**QUIET, max_steps=1)
    module.trainer = trainer
    with pytest.raises(MisconfigurationException, match="GradientFlowMonitor"):
        _ = module.gradient_flow


def test_resume_continues_the_history_without_duplicates(tmp_path: Path) -> None:
    steps_per_epoch = 6  # 96 samples, batch 16
    save = tmp_path / "gradlight"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(Net("mlp"), [GradientFlowMonitor(2, save), checkpoints], max_epochs=2, enable_checkpointing=True)
    first_run = load_history(save)
    # Resume from the end of epoch 1: the steps of epoch 2 already on disk are recomputed.
    ckpt = next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    fit(Net("mlp"), [GradientFlowMonitor(2, save)], max_epochs=3, ckpt_path=str(ckpt))
    resumed = load_history(save)
    assert not resumed.duplicated(["step", "layer", "metric"]).any()
    assert sorted(resumed.step.unique()) == list(range(0, 3 * steps_per_epoch, 2))
    key = ["step", "layer", "metric"]
    both = first_run.merge(resumed, on=key, suffixes=("_first", "_resumed"))
    grads = both[both.metric == "grad_l2"]
    np.testing.assert_allclose(grads.value_first, grads.value_resumed, rtol=1e-6)

    straight = tmp_path / "straight"
    fit(Net("mlp"), [GradientFlowMonitor(2, straight)], max_epochs=3)
    reference = load_history(straight)
    merged = reference.merge(resumed, on=key, suffixes=("_straight", "_resumed"))
    assert len(merged) == len(reference) == len(resumed)
    grads = merged[merged.metric == "grad_l2"]
    np.testing.assert_allclose(grads.value_straight, grads.value_resumed, rtol=1e-6)


def test_existing_history_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    fit(Net(), [GradientFlowMonitor(1, tmp_path)], max_steps=2)
    before = load_history(tmp_path)
    with pytest.raises(MisconfigurationException, match="overwrite=True"):
        fit(Net(), [GradientFlowMonitor(1, tmp_path)], max_steps=2)
    pd.testing.assert_frame_equal(load_history(tmp_path), before)
    fit(Net(), [GradientFlowMonitor(1, tmp_path, overwrite=True)], max_steps=1)
    assert sorted(load_history(tmp_path).step.unique()) == [0]


def test_save_dir_that_is_a_file_is_reported_in_setup(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(MisconfigurationException, match="is a file"):
        fit(Net(), [GradientFlowMonitor(1, target)], max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": -3}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps"),
        ({"log_every_n_steps": True}, "log_every_n_steps"),
        ({"save_dir": 12}, "save_dir"),
        ({"group_by": 0}, "group_by"),
        ({"group_by": "model"}, "group_by"),
        ({"exclude": "net.*"}, "exclude"),
        ({"edge_layers": 0}, "edge_layers"),
        ({"flush_every_n_records": 0}, "flush_every_n_records"),
        ({"sharding": "zero9"}, "sharding"),
        ({"sharding": 3}, "sharding"),
        ({"exclude": [1, 2]}, "exclude"),
        ({"exclude": 5}, "exclude"),
        ({"overwrite": "no"}, "overwrite"),
        ({"log_per_layer": 1}, "log_per_layer"),
        ({"track_update_ratio": None}, "track_update_ratio"),
        ({"log_histograms": "yes"}, "log_histograms"),
        ({"log_figures_every_n_epochs": 0}, "log_figures_every_n_epochs"),
    ],
)
def test_bad_constructor_values_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        GradientFlowMonitor(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(error.value)


def test_state_dict_round_trip() -> None:
    monitor = GradientFlowMonitor(1)
    monitor.load_state_dict({**monitor.state_dict(), "last_recorded_step": 7})
    restored = GradientFlowMonitor(1)
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict()["last_recorded_step"] == 7


def test_two_optimizers_under_manual_optimization(tmp_path: Path) -> None:
    class TwoOptimizers(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.critic = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            first, second = self.optimizers()
            x, y = batch
            loss = super().training_step(batch, batch_idx)
            first.zero_grad()
            self.manual_backward(loss)
            first.step()
            critic_loss = (self.critic(x) - y).pow(2).mean()
            second.zero_grad()
            self.manual_backward(critic_loss)
            second.step()
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.critic.parameters(), lr=0.1)

    reference = ReferenceNorms()
    fit(TwoOptimizers(), [reference, GradientFlowMonitor(1, tmp_path)], max_steps=4)
    history = load_history(tmp_path, metrics=["grad_l2"])
    layers_by_step = history.groupby("step").layer.apply(set).to_dict()
    assert layers_by_step == {
        0: {f"net.{i}" for i in range(0, 19, 2)},
        1: {"critic"},
        2: layers_by_step[0],
        3: {"critic"},
    }
    critic = reference.records[1]["critic"]["grad_l2"]
    assert layer_values(history, 1, "grad_l2")["critic"] == pytest.approx(critic, rel=1e-6)


def test_no_figures_without_an_image_logger_or_when_switched_off(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    fit(
        Net("mlp", samples=32, batch_size=8),
        [GradientFlowMonitor(2, tmp_path / "a", log_figures_every_n_epochs=None)],
        max_epochs=1,
        logger=logger,
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()
    assert "gradflow/global_grad_l2" in tags["scalars"]  # the summary still arrives (the reader works)
    assert tags["images"] == [] and tags["histograms"] == []
    fit(
        Net("mlp", samples=32, batch_size=8),
        [GradientFlowMonitor(2, tmp_path / "b")],
        max_epochs=1,
        logger=CSVLogger(tmp_path / "csv"),
    )  # no logger takes images: nothing drawn, nothing fails


def test_a_custom_sharding_reduction_is_used_as_given(tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting(LocalReduction):
        def __call__(self, sums: torch.Tensor, maxima: torch.Tensor, params: Any) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(sums.shape[1])
            return sums, maxima

    reduction = Counting()
    monitor = GradientFlowMonitor(1, tmp_path, sharding=reduction, diagnose=False)
    fit(Net("mlp"), [monitor], max_steps=2)
    assert monitor.recorder.tracker is not None and monitor.recorder.tracker.reduction is reduction
    assert calls == [len(list(Net("mlp").parameters()))] * 2  # every parameter, every logged step


def test_lazy_modules_are_profiled_at_the_first_captured_step(tmp_path: Path) -> None:
    class Lazy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.LazyLinear(16), nn.Sigmoid(), nn.LazyLinear(1))

    monitor = GradientFlowMonitor(1, tmp_path, on_anomaly="ignore")
    fit(Lazy(), [monitor], max_steps=2)
    assert monitor.recorder.diagnosis is not None
    profile = monitor.recorder.diagnosis.profile
    assert profile.num_layers == 2 and profile.saturating == ["sigmoid"]  # the initialised layers
    assert sorted(load_history(tmp_path, metrics=["grad_l2"]).layer.unique()) == ["net.0", "net.2"]


def test_two_monitors_both_record_under_manual_optimization(tmp_path: Path) -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            self.record_gradient_flow(opt)
            opt.step()
            return loss

    monitors = [GradientFlowMonitor(1, tmp_path / "a", diagnose=False), GradientFlowMonitor(2, tmp_path / "b")]
    fit(Manual(), monitors, max_steps=4)
    assert sorted(load_history(tmp_path / "a").step.unique()) == [0, 1, 2, 3]
    assert sorted(load_history(tmp_path / "b").step.unique()) == [0, 2]
    assert monitors[0].state_key != monitors[1].state_key


def test_a_checkpoint_written_before_state_key_existed_still_resumes(tmp_path: Path) -> None:
    save = tmp_path / "gradlight"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(Net("mlp"), [GradientFlowMonitor(2, save), checkpoints], max_epochs=1, enable_checkpointing=True)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("GradientFlowMonitor")]
    checkpoint["callbacks"]["GradientFlowMonitor"] = checkpoint["callbacks"].pop(key)  # the old key
    torch.save(checkpoint, path)
    fit(Net("mlp"), [GradientFlowMonitor(2, save)], max_epochs=2, ckpt_path=str(path))  # no "already holds"
    assert sorted(load_history(save).step.unique()) == list(range(0, 12, 2))
