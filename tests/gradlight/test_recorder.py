"""The Trainer-free recorder: a plain loop equals the callback, Fabric DDP equals one process, resume, options."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from gradlight import (
    GLOBAL_LAYER,
    GradientAnomalyError,
    GradientFlowMonitor,
    GradientFlowRecorder,
    HistoryExistsError,
    load_findings,
    load_history,
    read_run_info,
)
from gradlight.amp import grad_scale_left
from tests.gradlight._dist_workers import spawn
from tests.gradlight._fabric_workers import (
    STEPS,
    dataset,
    fabric_worker,
    make_model,
    make_optimizer,
    single_process,
    train,
)
from tests.gradlight.models import Net, make_dataset

QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)
FINDING_COLUMNS = ["kind", "layer", "step", "reported_step", "message", "cause", "remedy", "layers"]


def plain_loop(module: Net, save_dir: Path, steps: int, **kwargs: Any) -> GradientFlowRecorder:
    """``module`` trained by hand on the batches a Lightning Trainer gives it, recorded by a recorder."""
    recorder = GradientFlowRecorder(module, save_dir, **kwargs)
    optimizer = module.configure_optimizers()
    loader = DataLoader(make_dataset(module.kind, module.samples), batch_size=module.batch_size, shuffle=False)
    step = 0
    while step < steps:
        for batch_idx, batch in enumerate(loader):
            if step == steps:
                break
            recorder.start_step(step)
            loss = module.training_step(batch, batch_idx)
            loss.backward()
            recorder.capture(step, optimizer)
            optimizer.step()
            optimizer.zero_grad()
            recorder.end_step(loss)
            step += 1
    recorder.close()
    return recorder


def assert_same_history(expected: pd.DataFrame, actual: pd.DataFrame, rtol: float, skip: tuple[str, ...] = ()) -> None:
    key = ["step", "layer", "depth", "metric"]
    expected = expected[~expected.metric.isin(skip)].sort_values(key, ignore_index=True)
    actual = actual[~actual.metric.isin(skip)].sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(expected[key], actual[key])
    np.testing.assert_allclose(actual.value, expected.value, rtol=rtol, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------ plain PyTorch = callback
def test_plain_loop_gives_the_callbacks_history_findings_and_layers(tmp_path: Path) -> None:
    options: dict[str, Any] = dict(track_activations=True, on_anomaly="ignore")
    steps = 8
    monitor = GradientFlowMonitor(2, tmp_path / "callback", **options)
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=steps, callbacks=[monitor]).fit(Net("mlp"))
    recorder = plain_loop(Net("mlp"), tmp_path / "plain", steps, log_every_n_steps=2, **options)

    callback_history, plain_history = load_history(tmp_path / "callback"), load_history(tmp_path / "plain")
    assert sorted(plain_history.step.unique()) == [0, 2, 4, 6]
    assert {"grad_l2", "update_ratio", "act_saturation", "loss"} <= set(plain_history.metric)
    assert_same_history(callback_history, plain_history, rtol=1e-6)

    callback_findings = load_findings(tmp_path / "callback")
    plain_findings = load_findings(tmp_path / "plain")
    assert "vanishing" in set(plain_findings.kind)  # a 10-layer sigmoid MLP: the comparison is not vacuous
    pd.testing.assert_frame_equal(callback_findings[FINDING_COLUMNS], plain_findings[FINDING_COLUMNS])
    assert [f.kind for f in recorder.findings] == callback_findings.kind.tolist()

    callback_info, plain_info = read_run_info(tmp_path / "callback"), read_run_info(tmp_path / "plain")
    assert callback_info is not None and plain_info is not None
    assert (callback_info.trainer, plain_info.trainer) == ("lightning", "pytorch")
    assert plain_info.layers == callback_info.layers and len(plain_info.layers) == 10
    assert plain_info.activation_sites == callback_info.activation_sites != []
    assert plain_info.log_every_n_steps == callback_info.log_every_n_steps == 2


def test_steps_off_the_interval_do_nothing_and_depth_follows_forward_order(tmp_path: Path) -> None:
    class Reversed(nn.Module):  # registered a, b; run b then a
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 1)
            self.b = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(torch.relu(self.b(x)))

    model = Reversed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = GradientFlowRecorder(model, tmp_path, log_every_n_steps=3, diagnose=False)
    logged = []
    for step in range(7):
        model(torch.randn(5, 3)).sum().backward()
        logged.append(recorder.capture(step, optimizer))
        optimizer.step()
        assert recorder.end_step() == []
        optimizer.zero_grad()
    recorder.close()
    assert logged == [True, False, False, True, False, False, True]
    history = load_history(tmp_path, metrics=["grad_l2"])
    assert sorted(history.step.unique()) == [0, 3, 6]
    assert dict(zip(history.layer, history.depth)) == {"b": 0, "a": 1}


def test_stop_sets_should_stop_and_raise_raises_after_flushing(tmp_path: Path) -> None:
    for action in ("stop", "raise"):
        torch.manual_seed(0)
        model = Net("mlp")
        recorder = GradientFlowRecorder(model, tmp_path / action, log_every_n_steps=1, on_anomaly=action)
        optimizer = model.configure_optimizers()
        loader = DataLoader(make_dataset(), batch_size=16)
        stopped_at, raised = None, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step, batch in enumerate(loader):
                loss = model.training_step(batch, step)
                loss.backward()
                recorder.capture(step, optimizer)
                optimizer.step()
                optimizer.zero_grad()
                try:
                    recorder.end_step(loss)
                except GradientAnomalyError as error:
                    raised = (step, [f.kind for f in error.findings])
                    break
                if recorder.should_stop:
                    stopped_at = step
                    break
        recorder.close()
        reported = load_findings(tmp_path / action)
        first = int(reported.reported_step.min())
        assert reported.kind.iloc[0] == "vanishing"
        if action == "stop":
            assert stopped_at == first and raised is None
        else:
            assert raised is not None and raised[0] == first and "vanishing" in raised[1]
        assert load_history(tmp_path / action).step.max() == first  # flushed before the loop ended


def test_amp_scale_left_in_gradients_is_divided_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    expected = float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())
    optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, grad_scaler=scaler, diagnose=False)
    for step, unscale in enumerate((False, True)):
        scaler.scale(model(x).sum()).backward()
        if unscale:
            scaler.unscale_(optimizer)
        assert grad_scale_left(scaler, optimizer) == (1.0 if unscale else 2.0**10)
        recorder.capture(step, optimizer)
        scaler.step(optimizer)
        scaler.update()
        recorder.end_step()
        optimizer.zero_grad()
        assert recorder.latest is not None
        assert recorder.latest.global_metrics["global_grad_l2"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------- checkpoint / resume
def test_a_resumed_plain_loop_continues_one_history(tmp_path: Path) -> None:
    def run(save_dir: Path, start: int, stop: int, state: dict[str, Any] | None) -> dict[str, Any]:
        torch.manual_seed(0)
        model = make_model()
        optimizer = make_optimizer(model)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        recorder = GradientFlowRecorder(model, save_dir, log_every_n_steps=2, on_anomaly="ignore")
        if state is not None:
            recorder.load_state_dict(state["recorder"])
        batches = list(DataLoader(dataset(), batch_size=8))
        saved: dict[str, Any] = {}
        for step in range(start, stop):
            x, y = batches[step % len(batches)]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            recorder.capture(step, optimizer)
            optimizer.step()
            recorder.end_step(loss)
            optimizer.zero_grad()
            if step == 4:  # a checkpoint after step 4
                saved = copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "recorder": recorder.state_dict(),
                    }
                )
        recorder.close()
        return saved

    straight = tmp_path / "straight"
    run(straight, 0, 8, None)
    resumed = tmp_path / "resumed"
    state = run(resumed, 0, 7, None)  # "killed" after step 6: steps 5 and 6 are recomputed after resume
    with pytest.raises(HistoryExistsError, match="overwrite=True"):
        run(resumed, 5, 8, None)  # a new run may not write into another run's folder
    run(resumed, 5, 8, state)
    history = load_history(resumed)
    assert not history.duplicated(["step", "layer", "metric"]).any()
    assert sorted(history.step.unique()) == [0, 2, 4, 6]
    assert_same_history(load_history(straight), history, rtol=1e-6)
    assert len(list((resumed / "history").glob("segment-*.arrow"))) == 2


def test_two_monitors_checkpoint_and_resume_each_its_own_history(tmp_path: Path) -> None:
    steps_per_epoch = 6  # 96 samples, batch 16

    def monitors(root: Path) -> list[GradientFlowMonitor]:
        return [GradientFlowMonitor(1, root / "every"), GradientFlowMonitor(3, root / "third", group_by=1)]

    def fit(root: Path, epochs: int, ckpt_path: str | None = None, checkpoints: list[Any] | None = None) -> None:
        options = {**QUIET, "enable_checkpointing": bool(checkpoints)}
        trainer = L.Trainer(
            **options,
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[*monitors(root), *(checkpoints or [])],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Net("mlp"), ckpt_path=ckpt_path)

    run = tmp_path / "run"
    fit(run, 2, checkpoints=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)])
    ckpt = next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    keys = [key for key in torch.load(ckpt, weights_only=False)["callbacks"] if key.startswith("GradientFlowMonitor")]
    assert len(keys) == 2, keys
    fit(run, 3, ckpt_path=str(ckpt))  # resume from the end of epoch 1: epoch 2's steps are recomputed
    fit(tmp_path / "straight", 3)

    for name, interval, layers in (("every", 1, 10), ("third", 3, 1)):
        history = load_history(run / name)
        assert not history.duplicated(["step", "layer", "metric"]).any()
        assert sorted(history.step.unique()) == list(range(0, 3 * steps_per_epoch, interval))
        assert history[history.layer != GLOBAL_LAYER].layer.nunique() == layers
        assert_same_history(load_history(tmp_path / "straight" / name), history, rtol=1e-6)


def test_state_dict_round_trip_restores_counters_order_and_diagnosis() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1, on_anomaly="ignore")
    train(recorder, model, optimizer, DataLoader(dataset(), batch_size=8))
    state = recorder.state_dict()
    restored = GradientFlowRecorder(make_model(), None, log_every_n_steps=1, on_anomaly="ignore")
    restored.load_state_dict(state)
    assert restored.last_recorded_step == STEPS - 1
    assert restored.tracker.forward_order == recorder.tracker.forward_order
    assert restored.warnings_count == recorder.warnings_count >= 1
    assert restored.state_dict() == state
    assert not restored.is_logged_step(STEPS - 1) and restored.is_logged_step(STEPS)
    with pytest.raises(ValueError, match="version 2"):
        restored.load_state_dict({**state, "version": 2})


# ----------------------------------------------------------------------------------------------- Fabric
@pytest.mark.slow
def test_fabric_two_process_ddp_equals_one_process(tmp_path: Path) -> None:
    single_process(tmp_path / "single")
    spawn(fabric_worker, 2, str(tmp_path))
    expected, recorded = load_history(tmp_path / "single"), load_history(tmp_path / "fabric")
    assert sorted(recorded.step.unique()) == list(range(STEPS))
    assert {"grad_l2", "update_ratio", "act_saturation", "act_dead"} <= set(recorded.metric)
    assert_same_history(expected, recorded, rtol=1e-5)
    # The loss row is the global-batch loss (the mean of the ranks' losses), not rank zero's half batch.
    single_loss, ddp_loss = (frame[frame.metric == "loss"].set_index("step").value for frame in (expected, recorded))
    assert len(ddp_loss) == STEPS
    np.testing.assert_allclose(ddp_loss.to_numpy(), single_loss.to_numpy(), rtol=1e-6)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0["world_size"] == 2, "every rank computes the same statistics"
    single_findings = load_findings(tmp_path / "single")
    assert rank0["findings"] == single_findings[["kind", "layer", "step"]].values.tolist() != []
    assert len(list((tmp_path / "fabric" / "history").glob("segment-*.arrow"))) == 1, "only rank zero writes"
    info = read_run_info(tmp_path / "fabric")
    assert info is not None and (info.trainer, info.world_size, info.strategy) == ("fabric", 2, "DDPStrategy")


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"save_dir": 3}, "save_dir"),
        ({"exclude": "net.*"}, "exclude"),
        ({"track_activations": "yes"}, "track_activations"),
        ({"gradient_clip_val": "1"}, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "l2"}, "gradient_clip_algorithm"),
        ({"on_anomaly": "explode"}, "explode"),
    ],
)
def test_bad_recorder_arguments_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    options = {"save_dir": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        GradientFlowRecorder(nn.Linear(2, 1), **options)


def test_bad_step_and_optimizer_are_clear_errors() -> None:
    model = nn.Linear(2, 1)
    recorder = GradientFlowRecorder(model, None, log_every_n_steps=1)
    with pytest.raises(ValueError, match="`step` must be a non-negative int, got -1"):
        recorder.capture(-1, model.parameters())
    recorder.close()


# ------------------------------------------------------------------------------ run info: update methods
@pytest.mark.parametrize(
    ("make_optimizer", "expected"),
    [
        (lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True), "optimizer: AdamW (foreach)"),
        (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=False), "optimizer: SGD (for-loop)"),
        (lambda params: torch.optim.RMSprop(params, lr=1e-2), "copy: torch.optim.rmsprop.RMSprop is not reconstructed"),
    ],
    ids=["adamw", "sgd", "rmsprop-copy"],
)
def test_run_info_records_the_update_method_of_each_param_group(
    tmp_path: Path, make_optimizer: Any, expected: str
) -> None:
    """Listed optimizers are reconstructed from their state; others take the copy, and the run info says which."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = make_optimizer([{"params": net[0].parameters()}, {"params": net[2].parameters()}])
    recorder = GradientFlowRecorder(net, tmp_path, log_every_n_steps=1)
    for step in range(2):
        net(torch.randn(16, 4)).square().mean().backward()
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step()
        optimizer.zero_grad()
    recorder.close()
    methods = read_run_info(tmp_path).update_ratio_methods
    assert methods == {"0": expected, "1": expected}
    assert json.loads((tmp_path / "run.json").read_text())["update_ratio_methods"] == methods
