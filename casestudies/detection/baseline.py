"""The Ultralytics baseline: the unmodified detector trained by Ultralytics' own trainer, recorded by gradlight.

Launch (normally through the grid, which also trains the Lightning variants)::

    python -m casestudies.detection.baseline --data synthetic --epochs 8 --imgsz 128 --batch 32 --out runs/ul
    scripts/ablate_detector.sh --variants ultralytics

This is the quick-start call ``YOLO("yolo11n.yaml").train(data=..., epochs=...)`` made offline and comparable:

* offline: ``pretrained=False`` (no weights), ``amp=False`` (no AMP-check download), ``plots=False``, and
  :mod:`casestudies.detection.offline` (no font fetch, no telemetry, no auto-install);
* comparable: ``optimizer="SGD"`` (``"auto"`` picks AdamW/MuSGD and ignores ``lr0``), ``nbs = batch`` so that one
  optimizer step is one batch (Ultralytics otherwise accumulates to a nominal batch of 64, which would make
  its steps 2x-8x larger than the Lightning runs'), and the initial weights drawn with the same seed as the
  Lightning variants (:func:`casestudies.detection.module.build_detector`);
* recorded: by gradlight's public Ultralytics integration (:mod:`gradlight.integrations.ultralytics`, what
  any Ultralytics user calls): gradients read right after unscaling and before Ultralytics' hard-coded
  ``clip_grad_norm_(max_norm=10)`` (the norm that clipping computes is kept as the global metric
  ``clip_norm``), diagnosis and ``findings.jsonl``, with the layer names of the Lightning runs
  (``model.model.7``: ``prefix="model"``, as the LightningModule holds the ``DetectionModel`` as ``.model``),
  so histories line up layer by layer. :class:`BaselineTrainer` adds only the case study's seeded initial
  weights and the files the grid compares (``loss.csv``, ``train_stats.json``, ``progress.json``).

The final EMA weights (what Ultralytics itself validates) are scored by
:func:`casestudies.detection.evaluate.evaluate_detector`, the pycocotools evaluator of the Lightning runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG

from casestudies.detection import offline as _offline
from casestudies.detection.ablations import Ablation
from casestudies.detection.evaluate import evaluate_detector
from casestudies.detection.module import build_detector
from gradlight.integrations.ultralytics import CLIP_VALUE, GradientFlowDetectionTrainer, UltralyticsRecording
from gradlight.runfolder import write_json_atomic

__all__ = ["CLIP_VALUE", "GROUP_BY", "BaselineConfig", "BaselineRun", "BaselineTrainer", "train_baseline"]

#: Layer grouping of the Lightning runs (``DetectorModule(gradient_flow_group_by=3)``): one layer per YOLO block.
GROUP_BY = 3
#: Environment variable carrying :class:`BaselineRun` into Ultralytics' DDP worker processes.
RUN_ENV = "GRADLIGHT_BASELINE_RUN"


@dataclass
class BaselineRun:
    """What the baseline adds to gradlight's Ultralytics recording: its run folder and initial weights.

    Attributes:
        run_dir: Run folder; the history goes to ``run_dir/gradlight``, per-step losses to ``loss.csv``,
            progress to ``progress.json``, time and images to ``train_stats.json``.
        init_seed: Seed of the initial weights (the Lightning variants use the same one).
    """

    run_dir: str
    init_seed: int = 0


class BaselineTrainer(GradientFlowDetectionTrainer):
    """gradlight's recording Ultralytics trainer, with the case study's initial weights and run files.

    The gradient recording (read after unscaling, before Ultralytics' clipping; diagnosis; findings; resume)
    is :class:`gradlight.integrations.ultralytics.GradientFlowDetectionTrainer`'s. This class adds what the
    grid compares across trainers: the Lightning variants' seeded initial weights, ``loss.csv``,
    ``train_stats.json`` (training time and images, kept over a resume) and ``progress.json``.

    Args:
        cfg: Ultralytics cfg (defaults to ``DEFAULT_CFG``).
        overrides: Ultralytics overrides (``model``, ``data``, ``epochs``, ...).
        _callbacks: Ultralytics callbacks.
        recording: gradlight's recording settings; ``None`` reads them from the environment (DDP workers).
        run: The run folder and seed; ``None`` reads them from :data:`RUN_ENV` (DDP workers).
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict[str, Any] | None = None,
        recording: UltralyticsRecording | None = None,
        run: BaselineRun | None = None,
    ) -> None:
        self.run = run if run is not None else BaselineRun(**json.loads(os.environ[RUN_ENV]))
        os.environ[RUN_ENV] = json.dumps(asdict(self.run))  # Ultralytics' DDP workers rebuild this trainer
        self.run_dir = Path(self.run.run_dir)
        self.train_seconds = 0.0
        self.images_seen = 0
        self._epoch_start = 0.0
        super().__init__(cfg, overrides, _callbacks, recording)

    # ------------------------------------------------------------------------------------------------ model
    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """The unmodified model from its YAML, initialised with the Lightning runs' seed; never downloads."""
        if weights is not None and self.resume:  # Ultralytics' resume: last.pt's (EMA) weights
            return super().get_model(cfg, weights, verbose)
        if weights:
            raise ValueError("the baseline trains from scratch: pass a model YAML and pretrained=False")
        model = build_detector(str(cfg), int(self.data["nc"]), Ablation(), seed=self.run.init_seed)
        return self.set_model_names_for_load(model)

    # ------------------------------------------------------------------------ events (rank zero, see parent)
    def _gradlight_on_train_start(self) -> None:
        super()._gradlight_on_train_start()
        stats = self.run_dir / "train_stats.json"
        if self.start_epoch and stats.exists():  # resumed: keep the time and images of the finished epochs
            previous = json.loads(stats.read_text())
            self.train_seconds, self.images_seen = previous["train_seconds"], previous["images_seen"]
        else:
            (self.run_dir / "loss.csv").write_text("step,epoch,loss\n")

    def _gradlight_on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def _gradlight_on_train_batch_end(self) -> None:
        if self.loss_items is None:
            return
        items = self.loss_items.values() if isinstance(self.loss_items, dict) else self.loss_items
        loss = float(sum(float(v) for v in torch.as_tensor(list(items)).flatten()))
        with open(self.run_dir / "loss.csv", "a") as file:
            file.write(f"{self.optimizer_steps - 1},{self.epoch},{loss:.6g}\n")

    def _gradlight_on_train_epoch_end(self) -> None:
        super()._gradlight_on_train_epoch_end()
        self.train_seconds += time.perf_counter() - self._epoch_start
        self.images_seen += len(self.train_loader.dataset)
        write_progress(self.run_dir, self.epoch + 1, self.epochs)
        self._write_stats()  # last.pt is saved after this epoch: a resume starts from these counters

    def _gradlight_on_train_end(self) -> None:
        super()._gradlight_on_train_end()
        self._write_stats()

    def _write_stats(self) -> None:
        stats = {
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
            "optimizer_steps": self.optimizer_steps,
            "accumulate": self.accumulate,
        }
        write_json_atomic(self.run_dir / "train_stats.json", stats)


def write_progress(run_dir: Path, epoch: float, epochs: int) -> None:
    """Tell the grid's progress display how far a run is (``run_dir/progress.json``)."""
    write_json_atomic(Path(run_dir) / "progress.json", {"epoch": epoch, "epochs": epochs, "time": time.time()})


@dataclass
class BaselineConfig:
    """One baseline run.

    Attributes:
        data: Data YAML path (the grid resolves ``synthetic`` to its generated YAML first).
        run_dir: Output folder of this run.
        model: Model YAML (``yolo11n.yaml``, ``yolo26n.yaml``, ...).
        epochs: Training epochs.
        imgsz: Image size.
        batch: Batch size (all devices together, as Ultralytics counts it); ``nbs`` is set to it.
        workers: Dataloader workers (Ultralytics forces 0 on CPU).
        device: Ultralytics device string (``"cpu"``, ``"0"``, ``"0,1"`` for DDP).
        log_every_n_steps: Gradient-flow logging interval in optimizer steps.
        init_seed: Seed of the initial weights.
        backward_signal: Tap each block's backward signal on logged steps, like the Lightning variants
            (``track_backward_signal`` of the Ultralytics recording).
        overrides: Further Ultralytics overrides (``lr0``, ``warmup_epochs``, ...).
        resume: Continue from ``run_dir/ultralytics/weights/last.pt`` when it holds an unfinished run
            (Ultralytics' own resume: optimizer, EMA, epoch); otherwise start from scratch.
    """

    data: str
    run_dir: str
    model: str = "yolo11n.yaml"
    epochs: int = 10
    imgsz: int = 640
    batch: int = 16
    workers: int = 8
    device: str = "cpu"
    log_every_n_steps: int = 10
    init_seed: int = 0
    backward_signal: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    resume: bool = False

    def ultralytics_overrides(self) -> dict[str, Any]:
        """The ``model.train(...)`` arguments of the quick-start call, offline and comparable."""
        run_dir = Path(self.run_dir).resolve()
        return {
            **_offline.OFFLINE_OVERRIDES,
            "model": self.model,
            "data": self.data,
            "epochs": self.epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            "nbs": self.batch,
            "workers": self.workers,
            "device": self.device,
            "optimizer": "SGD",
            "pretrained": False,
            "val": False,
            "project": str(run_dir),
            "name": "ultralytics",
            "exist_ok": True,
            **self.overrides,
        }


def final_ema(trainer: DetectionTrainer) -> nn.Module:
    """The final EMA weights in float32: in memory, or from ``last.pt`` after DDP workers trained them."""
    if trainer.ema is not None:
        return trainer.ema.ema.float()
    checkpoint = torch.load(trainer.last, map_location="cpu", weights_only=False)
    return checkpoint["ema"].float()


def _resumable(last: Path, epochs: int) -> bool:
    """Whether ``last.pt`` holds an unfinished run Ultralytics can resume (0 < next epoch < epochs)."""
    if not last.exists():
        return False
    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # a torn file: start again
        return False
    next_epoch = int(checkpoint.get("epoch", -1)) + 1
    return 0 < next_epoch < epochs and checkpoint.get("optimizer") is not None


def _clear_run(run_dir: Path) -> None:
    """Remove what an earlier, unresumable attempt left (history, Ultralytics folder, logs)."""
    import shutil

    for name in ("gradlight", "ultralytics"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("loss.csv", "train_stats.json", "progress.json"):
        (run_dir / name).unlink(missing_ok=True)


def train_baseline(
    config: BaselineConfig, callbacks: Mapping[str, Sequence[Callable[[Any], None]]] | None = None
) -> dict[str, Any]:
    """Train the baseline, record its gradient flow, score its final EMA weights; write ``result.json``.

    Args:
        config: The run.
        callbacks: Extra Ultralytics callbacks by event (``{"on_train_batch_end": [fn]}``, each called with
            the trainer), run after the gradient-flow recorder's handler of the same event.

    Returns:
        The result: ``params``, ``epochs``, ``images_per_s``, ``train_seconds``, ``map50_95``, ``map50``,
        ``ultralytics_map50_95`` (Ultralytics' own validator on the same weights, for reference), ...

    Example:
        >>> config = BaselineConfig(data="shapes.yaml", run_dir="runs/ul", epochs=8, imgsz=128, batch=32)
        >>> train_baseline(config)["map50_95"]  # doctest: +SKIP
        0.43
    """
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    run = BaselineRun(str(run_dir), config.init_seed)
    recording = UltralyticsRecording(
        save_dir=str(run_dir / "gradlight"),
        log_every_n_steps=config.log_every_n_steps,
        group_by=GROUP_BY,
        prefix="model",
        track_backward_signal=config.backward_signal,
    )
    overrides = config.ultralytics_overrides()
    last = run_dir / "ultralytics" / "weights" / "last.pt"
    resumed = config.resume and _resumable(last, config.epochs)
    if resumed:
        overrides["resume"] = str(last)
    else:
        _clear_run(run_dir)
    trainer = BaselineTrainer(overrides=overrides, recording=recording, run=run)
    for event, functions in (callbacks or {}).items():
        for function in functions:
            trainer.add_callback(event, function)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    trainer.train()
    wall = time.perf_counter() - started
    ema = final_ema(trainer)
    device = trainer.device if trainer.world_size <= 1 else "cpu"
    scores = evaluate_detector(ema, config.data, imgsz=config.imgsz, batch=max(config.batch, 1), device=device)
    metrics = trainer.metrics or {}
    stats = json.loads((run_dir / "train_stats.json").read_text())  # written by rank 0 (a DDP worker too)
    result = {
        "trainer": "ultralytics",
        "params": sum(p.numel() for p in ema.parameters()),
        "epochs": config.epochs,
        "train_seconds": round(stats["train_seconds"], 2),
        "wall_seconds": round(wall, 2),
        "images_per_s": round(stats["images_seen"] / max(stats["train_seconds"], 1e-9), 2),
        "optimizer_steps": stats["optimizer_steps"],
        "map50_95": scores["map50_95"],
        "map50": scores["map50"],
        "ultralytics_map50_95": float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
        "nbs": config.batch,
        "resumed": resumed,
        "load_avg_start": round(load_start, 2),  # a shared machine's load skews images_per_s
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    write_json_atomic(run_dir / "result.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    """Train one baseline from the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="data YAML or 'synthetic'")
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every-n-steps", type=int, default=2)
    parser.add_argument("--out", default="runs/baseline")
    args = parser.parse_args(argv)
    data = args.data
    if data == "synthetic":
        from casestudies.detection.synthetic import generate_shapes_dataset

        data = str(generate_shapes_dataset(Path(args.out) / "data" / "shapes", 600, 100, 128))
    config = BaselineConfig(
        data=data,
        run_dir=args.out,
        model=args.model,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        log_every_n_steps=args.log_every_n_steps,
    )
    print(json.dumps(train_baseline(config), indent=2))


if __name__ == "__main__":
    main()
