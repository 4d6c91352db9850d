"""The Ultralytics integration: ``YOLO("yolo11n.yaml").train(...)`` recorded offline on tiny synthetic shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from casestudies.detection import offline

offline.configure_offline()

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from casestudies.detection.ablations import Ablation  # noqa: E402
from casestudies.detection.module import build_detector  # noqa: E402
from casestudies.detection.synthetic import generate_shapes_dataset  # noqa: E402
from gradlight import GLOBAL_LAYER, load_findings, load_history, read_run_info  # noqa: E402
from gradlight.integrations.ultralytics import CLIP_VALUE, GradientFlowDetectionTrainer, train  # noqa: E402

BATCH, NBS, TRAIN_IMAGES = 4, 8, 16  # accumulate nbs / batch = 2 micro-batches per optimizer step


class CountingTrainer(GradientFlowDetectionTrainer):
    """Counts the training micro-batches Ultralytics runs."""

    batches = 0

    def run_callbacks(self, event: str) -> None:
        if event == "on_train_batch_end":
            type(self).batches += 1
        super().run_callbacks(event)


class StrippedSigmoidTrainer(GradientFlowDetectionTrainer):
    """The textbook net: sigmoid activations, no BatchNorm, no residual adds (backbone)."""

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
        ablation = Ablation(residual=False, batchnorm=False, activation="sigmoid")
        return self.set_model_names_for_load(build_detector(str(cfg), int(self.data["nc"]), ablation, seed=0))


def train_args(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Ultralytics training arguments on a tiny offline shapes data set, generated in ``tmp_path``."""
    data = generate_shapes_dataset(tmp_path / "shapes", num_train=TRAIN_IMAGES, num_val=4, imgsz=64)
    return {
        "data": str(data),
        "imgsz": 64,
        "batch": BATCH,
        "device": "cpu",
        "workers": 0,
        "pretrained": False,
        "optimizer": "SGD",
        "val": False,
        "project": str(tmp_path / "ultralytics"),
        "exist_ok": True,
        "nbs": NBS,
        "epochs": 1,
        **offline.OFFLINE_OVERRIDES,
        **overrides,
    }


def fit(tmp_path: Path, name: str, trainer: type[GradientFlowDetectionTrainer], **kwargs: Any) -> Path:
    save_dir = tmp_path / name / "gradlight"
    train(YOLO("yolo11n.yaml"), save_dir=save_dir, trainer=trainer, **train_args(tmp_path, name=name, **kwargs))
    return save_dir


@pytest.mark.slow
def test_a_yolo_run_is_recorded_once_per_optimizer_step_before_clipping(tmp_path: Path) -> None:
    CountingTrainer.batches = 0
    save_dir = fit(tmp_path, "intact", CountingTrainer, log_every_n_steps=1, group_by=2)
    history = load_history(save_dir)
    steps = sorted(history.step.unique())
    assert CountingTrainer.batches == TRAIN_IMAGES // BATCH
    assert steps == list(range(CountingTrainer.batches // (NBS // BATCH)))  # one record per optimizer step

    blocks = {".".join(name.split(".")[:2]) for name, _ in DetectionModel("yolo11n.yaml", nc=3).named_parameters()}
    assert set(history[history.layer != GLOBAL_LAYER].layer) == blocks  # every block of the model, as built

    global_rows = history[history.layer == GLOBAL_LAYER].pivot(index="step", columns="metric", values="value")
    # torch's clip_grad_norm_ returns the norm before clipping: gradlight read exactly those gradients.
    np.testing.assert_allclose(global_rows.global_grad_l2, global_rows.clip_norm, rtol=1e-5)
    assert (global_rows.loss > 0).all()

    assert (save_dir / "findings.jsonl").is_file()
    load_findings(save_dir)  # readable
    info = read_run_info(save_dir)
    assert info is not None and info.trainer == "ultralytics" and info.gradient_clip_val == CLIP_VALUE
    assert info.accumulate_grad_batches == NBS // BATCH and info.extra["nbs"] == NBS


@pytest.mark.slow
def test_the_stripped_sigmoid_yolo_gets_a_vanishing_finding(tmp_path: Path) -> None:
    save_dir = fit(tmp_path, "stripped", StrippedSigmoidTrainer, log_every_n_steps=1, on_anomaly="ignore", nbs=BATCH)
    findings = load_findings(save_dir)
    vanishing = findings[findings.kind == "vanishing"]
    assert len(vanishing) >= 1 and vanishing.layer.iloc[0].startswith("model.0")


@pytest.mark.slow
def test_the_backward_signal_of_every_block_is_tapped_on_logged_steps(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(log_every_n_steps=1, group_by=2, nbs=BATCH)
    save_dir = fit(tmp_path, "signal", GradientFlowDetectionTrainer, track_backward_signal=True, **kwargs)
    plain = fit(tmp_path, "plain", GradientFlowDetectionTrainer, **kwargs)
    assert load_history(plain, metrics=["signal_l2"]).empty  # off by default
    signal = load_history(save_dir, metrics=["signal_l2", "signal_gain"])
    # the blocks of the layer grouping: those that own parameters (Upsample and Concat own none)
    blocks = {".".join(name.split(".")[:2]) for name, _ in DetectionModel("yolo11n.yaml", nc=3).named_parameters()}
    norms = signal[signal.metric == "signal_l2"]
    assert sorted(norms.step.unique()) == list(range(TRAIN_IMAGES // BATCH))  # every logged step
    assert set(norms.layer) == blocks and (norms.value > 0).all() and np.isfinite(norms.value).all()


class ScaledLossTrainer(GradientFlowDetectionTrainer):
    """AMP's loss scaling without autocast: a CPU ``GradScaler`` (Ultralytics turns AMP off on CPU) whose scale
    doubles after every step. A power-of-two scale changes no rounding, so the run equals an unscaled one."""

    def run_callbacks(self, event: str) -> None:
        if event == "on_train_start":
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        super().run_callbacks(event)


@pytest.mark.slow
def test_the_loss_scale_the_backward_ran_with_is_divided_out_of_the_signal(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(log_every_n_steps=1, group_by=2, nbs=BATCH, track_backward_signal=True)
    metrics = ["signal_l2", "grad_l2"]
    scaled = load_history(fit(tmp_path, "scaled", ScaledLossTrainer, **kwargs), metrics=metrics)
    plain = load_history(fit(tmp_path, "plain", GradientFlowDetectionTrainer, **kwargs), metrics=metrics)
    assert len(scaled) == len(plain) and sorted(scaled.step.unique()) == list(range(TRAIN_IMAGES // BATCH))
    merged = scaled.merge(plain, on=["step", "layer", "metric"], suffixes=("_scaled", "_plain"))
    np.testing.assert_allclose(merged.value_scaled, merged.value_plain, rtol=1e-5)


class Killed(RuntimeError):
    """Stands for the process dying mid-epoch."""


class Counted(GradientFlowDetectionTrainer):
    """Counts Ultralytics' optimizer steps (``optimizer_step`` calls) and those done before the last save."""

    calls = 0
    calls_at_save = 0

    def optimizer_step(self) -> None:
        Counted.calls += 1  # on the base class: subclasses share the counters
        super().optimizer_step()

    def run_callbacks(self, event: str) -> None:
        if event == "on_model_save":
            Counted.calls_at_save = Counted.calls
        super().run_callbacks(event)


class KilledInEpoch2(Counted):
    """Dies in the second epoch after one optimizer step, once Ultralytics saved ``last.pt`` for the first."""

    def run_callbacks(self, event: str) -> None:
        super().run_callbacks(event)
        if event == "on_train_batch_start" and self.epoch == 1 and Counted.calls == Counted.calls_at_save + 1:
            raise Killed("killed")


@pytest.mark.slow
def test_a_run_resumed_from_last_pt_continues_its_history(tmp_path: Path) -> None:
    with pytest.raises(Killed):
        fit(tmp_path, "resumed", KilledInEpoch2, log_every_n_steps=1, epochs=2)
    saved, died = Counted.calls_at_save, Counted.calls
    save_dir = tmp_path / "resumed" / "gradlight"
    assert sorted(load_history(save_dir).step.unique()) == list(range(died))  # the step after last.pt is on disk
    Counted.calls = 0
    last = tmp_path / "ultralytics" / "resumed" / "weights" / "last.pt"
    train(YOLO(str(last)), save_dir=save_dir, log_every_n_steps=1, resume=True, trainer=Counted)
    history = load_history(save_dir)
    assert not history.duplicated(["step", "layer", "metric"]).any()  # the recomputed step superseded the old
    assert sorted(history.step.unique()) == list(range(saved + Counted.calls))
    assert len(list((save_dir / "history").glob("segment-*.arrow"))) == 2


@pytest.mark.slow
def test_recording_does_not_change_what_ultralytics_trains(tmp_path: Path) -> None:
    """A monitored run (every step logged, diagnosis on) ends with the bare run's weights, bit for bit."""
    common = train_args(tmp_path, epochs=2, seed=0, deterministic=True)
    YOLO("yolo11n.yaml").train(name="bare", **common)
    train(YOLO("yolo11n.yaml"), save_dir=tmp_path / "monitored" / "gradlight", name="monitored", **common,
          log_every_n_steps=1)  # fmt: skip
    weights = [
        torch.load(tmp_path / "ultralytics" / name / "weights" / "last.pt", weights_only=False)["model"].state_dict()
        for name in ("bare", "monitored")
    ]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    assert load_history(tmp_path / "monitored" / "gradlight").step.nunique() >= 4  # every optimizer step recorded
