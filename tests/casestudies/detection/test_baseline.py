"""The Ultralytics baseline: recorded before clipping, Lightning layer names, scored by pycocotools."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from casestudies.detection.baseline import CLIP_VALUE, BaselineConfig, train_baseline
from casestudies.detection.module import DetectorModule
from casestudies.detection.synthetic import generate_shapes_dataset
from gradlight import GLOBAL_LAYER, load_findings, load_history
from gradlight.layers import layer_name_for


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("baseline")
    data = generate_shapes_dataset(root / "shapes", num_train=16, num_val=8, imgsz=64)
    config = BaselineConfig(
        data=str(data), run_dir=str(root / "run"), epochs=2, imgsz=64, batch=8, workers=0, log_every_n_steps=1
    )
    return train_baseline(config), root / "run"


@pytest.mark.slow
def test_result_and_run_info(baseline_run):
    result, run_dir = baseline_run
    assert result["trainer"] == "ultralytics"
    assert result["optimizer_steps"] == 4  # 16 images / batch 8 x 2 epochs: nbs = batch, no accumulation
    assert result["images_per_s"] > 0 and result["params"] > 2_000_000
    assert 0.0 <= result["map50_95"] <= result["map50"] <= 1.0
    info = json.loads((run_dir / "gradlight" / "run.json").read_text())
    assert info["gradient_clip_val"] == CLIP_VALUE == info["clip_value"] == 10.0
    assert info["accumulate_grad_batches"] == 1 and info["nbs"] == 8
    assert info["trainer"] == "ultralytics" and info["log_every_n_steps"] == 1
    # SGD's update is reconstructed from its state (no parameter copy) in every param group Ultralytics builds
    assert info["update_ratio_methods"] and all(
        m.startswith("optimizer: SGD") for m in info["update_ratio_methods"].values()
    )


@pytest.mark.slow
def test_the_baseline_is_diagnosed_through_the_public_integration(baseline_run):
    _, run_dir = baseline_run
    assert (run_dir / "gradlight" / "findings.jsonl").is_file()  # the integration's diagnosis ran
    findings = load_findings(run_dir / "gradlight")
    assert "severity" in findings.columns
    assert not (findings["severity"] == "warning").any(), findings[["kind", "layer", "message"]]  # healthy run


@pytest.mark.slow
def test_gradients_are_read_before_clipping(baseline_run):
    _, run_dir = baseline_run
    history = load_history(run_dir / "gradlight")
    glob = history[history["layer"] == GLOBAL_LAYER].pivot(index="step", columns="metric", values="value")
    assert glob.index.tolist() == [0, 1, 2, 3]
    # clip_grad_norm_ returns the norm before clipping: it must equal the recorded global norm exactly.
    np.testing.assert_allclose(glob["global_grad_l2"], glob["clip_norm"], rtol=1e-4)
    assert (glob["loss"] > 0).all() and np.isfinite(glob["early_late_ratio"]).all()
    losses = (run_dir / "loss.csv").read_text().splitlines()
    assert losses[0] == "step,epoch,loss" and len(losses) == 5


@pytest.mark.slow
def test_layer_names_are_those_of_the_lightning_module(baseline_run):
    _, run_dir = baseline_run
    module = DetectorModule("yolo11n.yaml", variant="intact", num_classes=3)
    group_by = module.configure_gradient_flow().group_by
    expected = {layer_name_for(name, group_by) for name, p in module.named_parameters() if p.requires_grad}
    history = load_history(run_dir / "gradlight", metrics=["grad_l2"])
    assert set(history["layer"]) == expected
    depths = history.groupby("layer")["depth"].first().sort_values()
    assert depths.index[0] == "model.model.0" and depths.index[-1] == "model.model.23"
    assert not math.isnan(history["value"].min())


@pytest.mark.slow
def test_yolo26n_baseline_trains_one_epoch_offline(tmp_path: Path) -> None:
    """The issue's quick-start call, ``YOLO("yolo26n.yaml").train(...)``, made offline: 1 epoch, 32 px."""
    data = generate_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=4, imgsz=32)
    config = BaselineConfig(
        data=str(data),
        run_dir=str(tmp_path / "run"),
        model="yolo26n.yaml",
        epochs=1,
        imgsz=32,
        batch=4,
        workers=0,
        log_every_n_steps=1,
    )
    result = train_baseline(config)
    assert result["optimizer_steps"] == 2 and result["epochs"] == 1  # 8 images / batch 4
    expected = DetectorModule("yolo26n.yaml", variant="intact", num_classes=3).model
    assert result["params"] == sum(p.numel() for p in expected.parameters())  # YOLO26, not YOLO11
    assert 0.0 <= result["map50_95"] <= result["map50"] <= 1.0
    history = load_history(tmp_path / "run" / "gradlight", metrics=["grad_l2"])
    assert sorted(history["step"].unique()) == [0, 1]
    depths = history.groupby("layer")["depth"].first().sort_values()
    assert depths.index[0] == "model.model.0" and depths.index[-1] == f"model.model.{len(expected.model) - 1}"
    assert np.isfinite(history["value"]).all()
