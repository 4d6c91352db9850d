"""The child side of the grid: train one run from its :class:`~casestudies.detection.grid.spec.RunSpec`.

The parent starts ``python -m casestudies.detection.grid.child OUT/runs/<name>/spec.json`` per run (clean
memory; Lightning's DDP launcher re-runs this command per rank). A Lightning variant trains with the gradlight
monitor and resumes from ``checkpoints/last.ckpt``; the baseline trains with Ultralytics' own trainer. Either
writes ``result.json`` when done (the parent's sign that the run is finished).

Example:
    >>> main(["runs/ablate_detector/default/runs/intact/spec.json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from casestudies.detection.distributed import CpuSyncBatchNorm
from casestudies.detection.grid.config import BASELINE, RESULT
from casestudies.detection.grid.spec import RunSpec, processes
from gradlight import GradientFlowMonitor
from gradlight.runfolder import write_json_atomic

if TYPE_CHECKING:
    from casestudies.detection.baseline import BaselineConfig
    from casestudies.detection.data import YoloDataModule
    from casestudies.detection.module import DetectorModule

#: Ultralytics callbacks for the baseline, by event name (``on_train_batch_end``: ``[fn(trainer)]``).
UltralyticsCallbacks = Mapping[str, Sequence[Callable[[Any], None]]]


class RunRecorder(Callback):
    """Per-step loss (``loss.csv``), training time and images, and ``progress.json`` of a Lightning run.

    The loss is the global batch's, per image (summed over ranks under DDP: one collective per step).

    Its counters are saved in checkpoints, so a resumed run reports throughput over all its epochs.

    Args:
        run_dir: The run's folder.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.train_seconds = 0.0
        self.images_seen = 0
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock."""
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Append the step's per-image loss to ``loss.csv``; every 5 batches, the progress."""
        from casestudies.detection.baseline import write_progress

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = torch.stack([loss.detach().float(), loss.new_tensor(float(batch["img"].shape[0]))])
        total = trainer.strategy.reduce(step, reduce_op="sum")  # ranks' shares of the global batch's loss
        value = float(total[0]) / (float(total[1]) * trainer.world_size)  # each share carries world_size
        if trainer.is_global_zero:
            with open(self.run_dir / "loss.csv", "a") as file:
                file.write(f"{trainer.global_step - 1},{trainer.current_epoch},{value:.6g}\n")
            fraction = (batch_idx + 1) / max(int(trainer.num_training_batches), 1)
            if batch_idx % 5 == 0:
                write_progress(self.run_dir, trainer.current_epoch + fraction, int(trainer.max_epochs or 0))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the epoch's time and images; report the epoch done."""
        from casestudies.detection.baseline import write_progress

        self.train_seconds += time.perf_counter() - self._epoch_start
        self.images_seen += len(trainer.train_dataloader.dataset) if trainer.train_dataloader else 0
        if trainer.is_global_zero:
            write_progress(self.run_dir, trainer.current_epoch + 1, int(trainer.max_epochs or 0))

    def state_dict(self) -> dict[str, Any]:
        """The counters, saved in checkpoints."""
        return {"train_seconds": self.train_seconds, "images_seen": self.images_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters of a resumed run."""
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.images_seen = int(state_dict.get("images_seen", 0))


def run(
    spec: RunSpec, callbacks: Sequence[Callback] = (), ultralytics_callbacks: UltralyticsCallbacks | None = None
) -> dict[str, Any]:
    """Train one run (in the run's subprocess); ``result.json`` is written when it is done.

    Args:
        spec: The run.
        callbacks: Extra Lightning callbacks of a variant run (after the monitor, recorder and checkpoint).
        ultralytics_callbacks: Extra Ultralytics callbacks of the baseline run.

    Returns:
        The result (empty on non-zero DDP ranks).
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    if spec.name == BASELINE:
        return train_baseline_run(spec, ultralytics_callbacks)
    return train_variant(spec, callbacks)


def single_process_note(spec: RunSpec) -> str | None:
    """Why the baseline trains in one process although ``spec.devices`` asks for more; None when it does not."""
    if processes(spec.name, spec.devices) == spec.devices:
        return None
    return (
        f"--devices {spec.devices} without CUDA: Ultralytics' DDP needs CUDA, so the baseline trains in one "
        f"process (the same global batch of {spec.batch} images)"
    )


def train_baseline_run(spec: RunSpec, callbacks: UltralyticsCallbacks | None = None) -> dict[str, Any]:
    """Train the Ultralytics baseline; its result records how many processes trained it and why."""
    from casestudies.detection.baseline import train_baseline

    note = single_process_note(spec)
    if note:
        print(f"ultralytics: {note}", flush=True)
    result = train_baseline(baseline_config(spec), callbacks=callbacks)
    if result:
        result = {**result, "devices": processes(spec.name, spec.devices), **({"devices_note": note} if note else {})}
        write_json_atomic(Path(spec.run_dir) / RESULT, result)
    return result


def train_variant(spec: RunSpec, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one Lightning variant with the gradlight monitor; resume from ``last.ckpt``; score the EMA."""
    from casestudies.detection.evaluate import evaluate_detector

    run_dir = Path(spec.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = last.exists()
    if not resuming and os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # DDP: rank 0 only
        (run_dir / "loss.csv").write_text("step,epoch,loss\n")
    L.seed_everything(spec.seed, verbose=False)
    datamodule, module = _build_lightning(spec)
    recorder = RunRecorder(run_dir)
    load_start = os.getloadavg()[0]
    trainer = _lightning_trainer(spec, [recorder, *callbacks], overwrite=not resuming)
    trainer.fit(module, datamodule, ckpt_path=str(last) if resuming else None)
    if not trainer.is_global_zero:
        return {}
    model = module.eval_model.float()  # the evaluator feeds float32 images (a 64-true run trained in float64)
    scores = evaluate_detector(model, spec.data, imgsz=spec.imgsz, batch=spec.batch, device=module.device)
    result = {
        "trainer": "lightning",
        "params": sum(p.numel() for p in module.model.parameters()),
        "epochs": spec.epochs,
        "train_seconds": round(recorder.train_seconds, 2),
        "images_per_s": round(recorder.images_seen / max(recorder.train_seconds, 1e-9), 2),
        "optimizer_steps": trainer.global_step,
        "devices": trainer.world_size,
        "map50_95": scores["map50_95"],
        "map50": scores["map50"],
        "resumed": resuming,
        "load_avg_start": round(load_start, 2),  # a shared machine's load skews images_per_s
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    write_json_atomic(run_dir / RESULT, result)
    return result


def _build_lightning(spec: RunSpec) -> tuple[YoloDataModule, DetectorModule]:
    from casestudies.detection.data import YoloDataModule
    from casestudies.detection.module import DetectorModule

    gpu = torch.cuda.is_available()
    datamodule = YoloDataModule(
        spec.data,
        imgsz=spec.imgsz,
        batch_size=spec.batch // spec.devices,  # validated: a multiple of devices
        workers=spec.workers if gpu else 0,
        seed=spec.seed,
        augment=spec.augment or None,
        allow_download=True,
    )
    module = DetectorModule(
        spec.model,
        variant=spec.name,
        num_classes=datamodule.num_classes,
        names=datamodule.names,
        training={**spec.training, "nbs": spec.batch},
        init_seed=spec.seed,
    )
    return datamodule, module


def _lightning_trainer(spec: RunSpec, callbacks: Sequence[Callback], overwrite: bool) -> L.Trainer:
    run_dir = Path(spec.run_dir)
    monitor = GradientFlowMonitor(  # the taps sit on the layer grouping's blocks: one per YOLO block
        log_every_n_steps=spec.log_every_n_steps,
        save_dir=run_dir / "gradlight",
        overwrite=overwrite,
        track_backward_signal=spec.backward_signal,
    )
    # One file, overwritten every epoch: `save_last` alone saves nothing when no top-k checkpoint is saved.
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    recorder, *extra = callbacks
    gpu, several = torch.cuda.is_available(), spec.devices > 1
    return L.Trainer(
        max_epochs=spec.epochs,
        accelerator="gpu" if gpu else "cpu",
        devices=spec.devices,  # on CPU: processes (DDP over gloo)
        strategy="ddp" if several else "auto",
        sync_batchnorm=several and gpu,  # global-batch BN statistics: torch's SyncBatchNorm needs GPUs ...
        plugins=[CpuSyncBatchNorm()] if several and not gpu else None,  # ... this one runs on CPU
        precision=spec.precision,
        callbacks=[monitor, recorder, checkpoint, *extra],
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )


def baseline_config(spec: RunSpec) -> BaselineConfig:
    """The :class:`~casestudies.detection.baseline.BaselineConfig` of a run spec."""
    from casestudies.detection.baseline import BaselineConfig

    gpu = torch.cuda.is_available()
    device = ",".join(str(i) for i in range(spec.devices)) if gpu else "cpu"
    recipe = {k: v for k, v in spec.training.items() if k not in ("nbs", "ema", "ema_tau", "grad_clip_norm")}
    return BaselineConfig(
        data=spec.data,
        run_dir=spec.run_dir,
        model=spec.model,
        epochs=spec.epochs,
        imgsz=spec.imgsz,
        batch=spec.batch,
        workers=spec.workers if gpu else 0,
        device=device,
        log_every_n_steps=spec.log_every_n_steps,
        init_seed=spec.seed,
        resume=spec.resume,
        backward_signal=spec.backward_signal,
        overrides={**recipe, **spec.augment, "seed": spec.seed},
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m casestudies.detection.grid.child SPEC_JSON``: train that run; returns the exit code."""
    from casestudies.detection.offline import configure_offline

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m casestudies.detection.grid.child OUT/runs/<name>/spec.json", file=sys.stderr)
        return 2
    configure_offline()  # before anything imports ultralytics
    run(RunSpec.load(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
