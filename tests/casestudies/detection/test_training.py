"""Training in Lightning: mAP improves, the stripped sigmoid net starves early layers, offline all along."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pandas as pd
import pytest

from casestudies.detection import offline

offline.configure_offline()

from casestudies.detection.data import YoloDataModule  # noqa: E402
from casestudies.detection.evaluate import evaluate_detector  # noqa: E402
from casestudies.detection.module import DetectorModule  # noqa: E402
from gradlight import GLOBAL_LAYER, GradientFlowMonitor, load_history  # noqa: E402

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def test_offline_settings_are_in_force() -> None:
    from ultralytics.utils import ONLINE, SETTINGS, USER_CONFIG_DIR

    assert offline.is_offline()
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "0"
    assert not ONLINE and SETTINGS["sync"] is False
    assert (Path(USER_CONFIG_DIR) / "Arial.ttf").stat().st_size > 100_000
    assert offline.OFFLINE_OVERRIDES["amp"] is False and offline.OFFLINE_OVERRIDES["plots"] is False


def monitored_history(variant: str, coco8_yaml: Path, save_dir: Path, steps: int = 3) -> pd.DataFrame:
    L.seed_everything(0, verbose=False)
    dm = YoloDataModule(str(coco8_yaml), imgsz=64, batch_size=2, workers=0)
    module = DetectorModule("yolo11n.yaml", variant, num_classes=dm.num_classes, names=dm.names)
    monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=save_dir)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, callbacks=[monitor], **QUIET)
    trainer.fit(module, dm)
    return load_history(save_dir)


def early_late(history: pd.DataFrame) -> float:
    rows = history[(history.layer == GLOBAL_LAYER) & (history.metric == "early_late_ratio")]
    return float(rows.sort_values("step").value.iloc[-1])


def test_stripped_sigmoid_starves_early_layers_on_coco8(coco8_yaml: Path, tmp_path: Path) -> None:
    intact = monitored_history("intact", coco8_yaml, tmp_path / "intact")
    stripped = monitored_history("stripped_sigmoid", coco8_yaml, tmp_path / "stripped")

    assert sorted(intact.step.unique()) == sorted(stripped.step.unique()) == [0, 1, 2]
    layers = {name for name in intact.layer.unique() if name != GLOBAL_LAYER}
    assert layers == {name for name in stripped.layer.unique() if name != GLOBAL_LAYER}  # comparable names
    assert "model.model.0" in layers
    intact_ratio, stripped_ratio = early_late(intact), early_late(stripped)
    assert 0 < stripped_ratio <= intact_ratio * 1e-4, (intact_ratio, stripped_ratio)


def test_short_training_improves_intact_map_on_synthetic_shapes(synthetic_root: Path) -> None:
    L.seed_everything(0, verbose=False)
    no_augmentation = {"mosaic": 0.0, "scale": 0.0, "translate": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
    dm = YoloDataModule(
        "synthetic",
        imgsz=64,
        batch_size=16,
        workers=0,
        overfit=True,  # evaluate on the 64 training images: the fastest signal that learning happens
        augment=no_augmentation,
        synthetic_root=str(synthetic_root),
        synthetic_train=64,
        synthetic_val=16,
    )
    module = DetectorModule(
        "yolo11n.yaml",
        "intact",
        num_classes=dm.num_classes,
        names=dm.names,
        training={"nbs": 16, "lr0": 0.02, "warmup_epochs": 1.0},
    )
    untrained = evaluate_detector(module.model, dm.data, imgsz=64, batch=16, rect=False)
    epochs = 25
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, check_val_every_n_epoch=epochs, **QUIET)
    trainer.fit(module, dm)

    trained = evaluate_detector(module.eval_model, dm.data, imgsz=64, batch=16, rect=False)
    assert trained["map50"] > untrained["map50"] + 0.02, (untrained, trained)
    assert trained["map50_95"] > untrained["map50_95"], (untrained, trained)
    # The in-loop metric (sharded val loop, EMA weights) is the standalone evaluator's number.
    assert float(trainer.callback_metrics["val/map50_95"]) == pytest.approx(trained["map50_95"], abs=1e-6)


@pytest.mark.slow
def test_two_process_ddp_training_step_on_cpu(coco8_yaml: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.casestudies.detection._ddp_worker import free_port, run_rank

    mp.spawn(run_rank, args=(2, free_port(), str(coco8_yaml), str(tmp_path)), nprocs=2, join=True)

    results = [pd.read_json(tmp_path / f"rank{rank}.json", typ="series") for rank in range(2)]
    for result in results:
        assert result["global_step"] == 2 and result["loss_finite"] and result["changed"]
        assert result["world_size"] == 2
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-6)  # ranks stayed in sync
    assert 0.0 <= results[0]["map50_95"] <= 1.0
    history = load_history(tmp_path / "gradlight")
    assert sorted(history.step.unique()) == [0, 1]


def test_yolo26_trains_with_its_end_to_end_loss_updated_each_epoch(coco8_yaml: Path) -> None:
    dm = YoloDataModule(str(coco8_yaml), imgsz=64, batch_size=2, workers=0)
    module = DetectorModule("yolo26n.yaml", "no_residual", num_classes=dm.num_classes, names=dm.names, scope="all")
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=0, **QUIET)
    trainer.fit(module, dm)
    assert type(module.model.criterion).__name__ == "E2ELoss"
    assert module.model.criterion.updates == 2  # o2m weight decays once per epoch, as in Ultralytics' trainer
