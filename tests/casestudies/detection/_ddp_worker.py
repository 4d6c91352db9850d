"""Top-level worker of the 2-process DDP test (``torch.multiprocessing.spawn`` needs an importable function)."""

from __future__ import annotations

import json
from pathlib import Path

from tests._distributed import init_env


def run_rank(rank: int, world_size: int, port: int, data_yaml: str, out_dir: str) -> None:
    init_env(rank, world_size, port)
    import lightning as L
    import torch

    from casestudies.detection import offline

    offline.configure_offline()
    from casestudies.detection.data import YoloDataModule
    from casestudies.detection.module import DetectorModule
    from gradlight import GradientFlowMonitor

    L.seed_everything(0, verbose=False)
    dm = YoloDataModule(data_yaml, imgsz=64, batch_size=1, workers=0)
    module = DetectorModule("yolo11n.yaml", "no_bn", num_classes=dm.num_classes, names=dm.names)
    before = [p.detach().clone() for p in module.model.parameters()]
    losses: list[float] = []

    class LossProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradientFlowMonitor(log_every_n_steps=1, save_dir=Path(out_dir) / "gradlight"), LossProbe()],
    )
    trainer.fit(module, dm)
    after = list(module.model.parameters())
    result = {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "loss_finite": bool(losses) and all(torch.isfinite(torch.tensor(losses)).tolist()),
        "changed": any(not torch.equal(a, b) for a, b in zip(after, before)),
        "checksum": float(sum(p.detach().double().sum() for p in after)),
        "map50_95": float(trainer.callback_metrics.get("val/map50_95", torch.tensor(-1.0))),
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
