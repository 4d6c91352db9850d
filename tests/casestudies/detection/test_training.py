"""Training in Lightning: mAP improves, the stripped sigmoid net starves early layers, offline all along."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

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
    from tests._distributed import spawn
    from tests.casestudies.detection._ddp_worker import run_rank

    spawn(run_rank, 2, str(coco8_yaml), str(tmp_path))

    results = [pd.read_json(tmp_path / f"rank{rank}.json", typ="series") for rank in range(2)]
    for result in results:
        assert result["global_step"] == 2 and result["loss_finite"] and result["changed"]
        assert result["world_size"] == 2
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-6)  # ranks stayed in sync
    assert 0.0 <= results[0]["map50_95"] <= 1.0
    history = load_history(tmp_path / "gradlight")
    assert sorted(history.step.unique()) == [0, 1]


def ultralytics_o2m(updates: int, epochs: int) -> float:
    """``E2ELoss.decay`` (ultralytics/utils/loss.py): 0.8 -> 0.1 linearly over ``epochs - 1`` updates."""
    return max(1 - updates / max(epochs - 1, 1), 0) * (0.8 - 0.1) + 0.1


class CriterionRecorder(L.Callback):
    """The E2ELoss schedule as each epoch starts: (epoch, updates, o2m, o2o)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        criterion = pl_module.model.criterion
        self.seen.append((trainer.current_epoch, criterion.updates, criterion.o2m, criterion.o2o))


def fit_yolo26(coco8_yaml: Path, epochs: int, checkpoints: Path, ckpt_path: Path | None = None) -> CriterionRecorder:
    dm = YoloDataModule(str(coco8_yaml), imgsz=64, batch_size=2, workers=0)
    module = DetectorModule("yolo26n.yaml", "no_residual", num_classes=dm.num_classes, names=dm.names, scope="all")
    recorder = CriterionRecorder()
    saver = ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    quiet = {**QUIET, "enable_checkpointing": True}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[recorder, saver],
        **quiet,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    criterion = module.model.criterion
    assert type(criterion).__name__ == "E2ELoss"
    assert criterion.one2one.hyp.epochs == criterion.one2many.hyp.epochs == epochs  # not the cfg's 100
    assert criterion.updates == epochs  # one update per epoch, as in Ultralytics' trainer
    assert criterion.o2m == pytest.approx(0.1) and criterion.o2o == pytest.approx(0.9)  # the final gains
    return recorder


def test_yolo26_end_to_end_loss_follows_ultralytics_schedule_and_resumes(coco8_yaml: Path, tmp_path: Path) -> None:
    epochs = 4
    full = fit_yolo26(coco8_yaml, epochs, tmp_path / "full")
    expected = [(e, e, ultralytics_o2m(e, epochs), 1 - ultralytics_o2m(e, epochs)) for e in range(epochs)]
    assert full.seen == [pytest.approx(row) for row in expected]
    assert [round(row[2], 4) for row in full.seen] == [0.8, 0.5667, 0.3333, 0.1]

    # Killed after epoch 2 (index 1): the resumed run continues the schedule instead of restarting at 0.8.
    checkpoint = tmp_path / "full" / "epoch=1.ckpt"
    assert torch.load(checkpoint, weights_only=False)["criterion_updates"] == 2
    resumed = fit_yolo26(coco8_yaml, epochs, tmp_path / "resumed", ckpt_path=checkpoint)
    assert resumed.seen == full.seen[2:]


@pytest.mark.parametrize(("world_size", "accumulate", "expected"), [(1, 1, 0.25), (1, 4, 1.0), (8, 1, 2.0)])
def test_weight_decay_scales_with_the_global_batch_like_ultralytics(
    world_size: int, accumulate: int, expected: float
) -> None:
    # Ultralytics: weight_decay * batch * accumulate / nbs, batch counting every device (16 per process here).
    module = DetectorModule("yolo11n.yaml", "intact", num_classes=3, training={"nbs": 64})
    module._trainer = SimpleNamespace(
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        datamodule=SimpleNamespace(batch_size=16),
        max_epochs=10,
    )
    groups = module.configure_optimizers()["optimizer"].param_groups
    decay = {group["param_group"]: group["weight_decay"] for group in groups}
    assert decay == {"weight": pytest.approx(module.recipe.weight_decay * expected), "bn": 0.0, "bias": 0.0}
