"""``DetectorModule``: an (ablated) Ultralytics YOLO detector trained by Lightning with Ultralytics' recipe.

What is Ultralytics' and what is Lightning's:

* model, loss (``model.loss(batch)`` with ``model.args = get_cfg(DEFAULT_CFG)`` + loss gains), NMS, EMA
  (``ModelEMA``), parameter groups and the warm-up / LR schedule follow ``ultralytics.engine.trainer``;
* devices, DDP, gradient accumulation, checkpoints and logging are Lightning's: ``devices=N,
  strategy="ddp"`` works unchanged. As in Ultralytics, the loss is multiplied by the world size because DDP
  averages gradients over ranks; unlike Ultralytics, each rank's loss is its share of the *global* batch's
  loss (:class:`~casestudies.detection.distributed.GlobalBatchLoss`: the normaliser, the sum of assigned
  target scores, is summed over ranks), so the averaged gradient is the global batch's. With the same images
  per global batch and global BatchNorm statistics (``sync_batchnorm=True`` on GPUs,
  :class:`~casestudies.detection.distributed.CpuSyncBatchNorm` on CPU) it equals the one-process gradient.

Differences from Ultralytics' trainer, on purpose: accumulation is the Trainer's fixed
``accumulate_grad_batches`` (Ultralytics ramps it from 1 during warm-up); no multi-scale training; in-loop
validation letterboxes to a square ``imgsz`` so that DDP can shard it.

Example:
    >>> module = DetectorModule("yolo11n.yaml", variant="stripped_sigmoid", num_classes=3)
    >>> module.ablation.describe(), module.recipe.lr0
    ('no_residual+no_bn+sigmoid@backbone', 0.01)
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.torch_utils import ModelEMA

from casestudies.detection import offline as _offline
from casestudies.detection.ablations import Ablation
from casestudies.detection.distributed import global_batch_loss, world_size
from casestudies.detection.evaluate import (
    coco_ground_truth,
    coco_map,
    detections_to_coco,
    postprocess,
    uses_end2end_head,
)
from casestudies.detection.variants import TrainingRecipe, get_variant
from gradlight import GradientFlowMixin, GradientFlowSpec

_NORM_TYPES = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))


def build_detector(
    model: str, num_classes: int, ablation: Ablation, seed: int | None = 0, loss_gains: dict | None = None
) -> DetectionModel:
    """Build an Ultralytics ``DetectionModel`` from a packaged YAML (no download) and apply ``ablation``.

    Args:
        model: Model YAML, e.g. ``"yolo11n.yaml"`` or ``"yolo26s.yaml"`` (scale from the file name).
        num_classes: Number of classes of the head.
        ablation: Architecture changes to apply.
        seed: Seed for the initial weights; the same seed gives every variant the same starting conv weights.
        loss_gains: Loss gains (``box``, ``cls``, ``dfl``) written into ``model.args``.

    Example:
        >>> build_detector("yolo11n.yaml", 3, Ablation(batchnorm=False)).model[0].bn
        NoNorm(16)
    """
    if not str(model).endswith((".yaml", ".yml")):
        raise ValueError(f"model={model!r} is not valid; give a model YAML such as 'yolo11n.yaml' (no weights).")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not valid; it must be at least 1.")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            detector = DetectionModel(model, nc=num_classes, verbose=False)
    else:
        detector = DetectionModel(model, nc=num_classes, verbose=False)
    ablation.apply(detector)
    detector.args = get_cfg(DEFAULT_CFG, {**_offline.OFFLINE_OVERRIDES, **(loss_gains or {})})
    return detector


def ultralytics_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters like Ultralytics: weights with decay, norm weights and biases without.

    Example:
        >>> groups = ultralytics_param_groups(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), 5e-4)
        >>> [(g["param_group"], len(g["params"]), g["weight_decay"]) for g in groups]
        [('weight', 1, 0.0005), ('bn', 1, 0.0), ('bias', 2, 0.0)]
    """
    weights, norm_weights, biases = [], [], []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if "bias" in f"{module_name}.{param_name}":
                biases.append(param)
            elif isinstance(module, _NORM_TYPES):
                norm_weights.append(param)
            else:
                weights.append(param)
    return [
        {"params": weights, "weight_decay": weight_decay, "param_group": "weight"},
        {"params": norm_weights, "weight_decay": 0.0, "param_group": "bn"},
        {"params": biases, "weight_decay": 0.0, "param_group": "bias"},
    ]


def linear_or_cosine(recipe: TrainingRecipe, epochs: int) -> Any:
    """Ultralytics' LR factor per epoch: linear (or cosine) from 1 to ``lrf``.

    Example:
        >>> round(linear_or_cosine(TrainingRecipe(), 10)(10), 4)
        0.01
    """
    if recipe.cos_lr:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (recipe.lrf - 1) + 1
    return lambda x: max(1 - x / epochs, 0) * (1.0 - recipe.lrf) + recipe.lrf


class DetectorModule(GradientFlowMixin, L.LightningModule):
    """An ablated Ultralytics YOLO detector, its loss, and Ultralytics' optimizer recipe.

    Args:
        model: Packaged model YAML (``yolo11n.yaml`` default; ``yolo26n.yaml``, larger scales).
        variant: Grid variant name (see :mod:`casestudies.detection.variants`).
        num_classes: Classes of the data (the CLI links it from the datamodule).
        residual: Overrides the variant's residual switch when not None.
        batchnorm: Overrides the variant's BatchNorm switch when not None.
        activation: Overrides the variant's activation when not None (``"sigmoid"``, ``"silu"``, ...).
        scope: Overrides the variant's scope when not None (``"backbone"`` or ``"all"``).
        weight_init: Conv weight init of BN-free convs when not None: ``"keep"`` (PyTorch default, as built)
            or ``"kaiming"`` (fan-in Kaiming normal; see :func:`~casestudies.detection.ablations.remove_batchnorm`).
        training: Overrides of the variant's :class:`TrainingRecipe` fields (e.g. ``{"lr0": 0.005}``).
        names: Class names, stored on the model for Ultralytics tools.
        init_seed: Seed of the initial weights (identical across variants for the same seed).
        gradient_flow_group_by: Layer grouping for the monitor: leading name components (3 gives one layer per
            YOLO block, ``model.model.7``, identical names across variants) or None (one per module).

    Example:
        >>> DetectorModule(variant="intact", num_classes=3, batchnorm=False).ablation.describe()
        'no_bn@backbone'
    """

    def __init__(
        self,
        model: str = "yolo11n.yaml",
        variant: str = "intact",
        num_classes: int = 80,
        residual: bool | None = None,
        batchnorm: bool | None = None,
        activation: str | None = None,
        scope: str | None = None,
        weight_init: str | None = None,
        training: dict[str, Any] | None = None,
        names: dict[int, str] | None = None,
        init_seed: int = 0,
        gradient_flow_group_by: int | None = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        chosen = get_variant(variant)
        switches = {
            "residual": residual,
            "batchnorm": batchnorm,
            "activation": activation,
            "scope": scope,
            "weight_init": weight_init,
        }
        base = chosen.ablation
        self.ablation = Ablation(
            residual=base.residual if residual is None else residual,
            batchnorm=base.batchnorm if batchnorm is None else batchnorm,
            activation=base.activation if activation is None else activation,
            scope=base.scope if scope is None else scope,
            weight_init=base.weight_init if weight_init is None else weight_init,
        )
        self.explicit_switches = {k: v for k, v in switches.items() if v is not None}
        self.recipe = chosen.recipe(training)
        self.model = build_detector(model, num_classes, self.ablation, init_seed, self.recipe.loss_gains())
        self.model.names = dict(names) if names else {i: str(i) for i in range(num_classes)}
        self.gradient_flow_group_by = gradient_flow_group_by
        self.ema: ModelEMA | None = None
        self._pending_ema_state: dict[str, Any] | None = None
        self._pending_criterion_updates: int | None = None
        self._val_detections: dict[int, list[dict[str, Any]]] = {}
        self._val_ground_truth: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- gradlight
    def configure_gradient_flow(self) -> GradientFlowSpec | None:
        """Group parameters per YOLO block so histories of all variants share layer names."""
        return GradientFlowSpec(group_by=self.gradient_flow_group_by)

    # ------------------------------------------------------------------------------------------------ steps
    def forward(self, images: torch.Tensor) -> Any:
        """Run the detector on float images in [0, 1]."""
        return self.model(images)

    def _to_float(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Images as floats in [0, 1], in the module's dtype (float64 under ``precision="64-true"``)."""
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point else torch.float32
        return {**batch, "img": batch["img"].to(dtype) / 255}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Ultralytics' loss on one batch (summed components times batch size, times world size).

        Under DDP the criterion gives this rank's share of the global batch's loss (see the module docstring).
        """
        batch = self._to_float(batch)
        loss, items = self.model.loss(batch)
        batch_size = batch["img"].shape[0]
        for name, value in self._named_items(items).items():
            self.log(f"train/{name}", value, batch_size=batch_size, prog_bar=name.startswith("box"))
        return loss.sum() * self.trainer.world_size

    @staticmethod
    def _named_items(items: Any) -> dict[str, float]:
        if isinstance(items, dict):
            return {str(k): float(v) for k, v in items.items()}
        return {name: float(v) for name, v in zip(("box", "cls", "dfl"), torch.as_tensor(items).flatten())}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Ultralytics' warm-up: LR from 0 (biases from ``warmup_bias_lr``) and momentum ramp to their targets."""
        batches = max(int(self.trainer.num_training_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup_iters = round(min(self.recipe.warmup_epochs, max(epochs - 1, 0)) * batches)
        step = batch_idx + batches * self.current_epoch
        if not warmup_iters or step > warmup_iters:
            return
        factor = self._lr_factor(self.current_epoch)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                start = self.recipe.warmup_bias_lr if group.get("param_group") == "bias" else 0.0
                group["lr"] = float(np.interp(step, [0, warmup_iters], [start, group["initial_lr"] * factor]))
                group["momentum"] = float(
                    np.interp(step, [0, warmup_iters], [self.recipe.warmup_momentum, self.recipe.momentum])
                )

    def _lr_factor(self, epoch: int) -> float:
        return linear_or_cosine(self.recipe, max(int(self.trainer.max_epochs or 1), 1))(epoch)

    def configure_optimizers(self) -> Any:
        """SGD (Nesterov) with Ultralytics' parameter groups and per-epoch linear/cosine LR.

        Weight decay is scaled like Ultralytics' ``weight_decay * batch * accumulate / nbs``, where ``batch`` is
        the global batch (Ultralytics' ``batch`` counts all devices): per-process batch times world size.
        """
        batch_size = self._train_batch_size() * max(int(self.trainer.world_size), 1)
        accumulate = max(int(self.trainer.accumulate_grad_batches), 1)
        weight_decay = self.recipe.weight_decay * batch_size * accumulate / self.recipe.nbs
        groups = ultralytics_param_groups(self.model, weight_decay)
        optimizer = torch.optim.SGD(groups, lr=self.recipe.lr0, momentum=self.recipe.momentum, nesterov=True)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=linear_or_cosine(self.recipe, epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _train_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        return int(getattr(datamodule, "batch_size", None) or self.recipe.nbs)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip the global norm at ``recipe.grad_clip_norm`` (or the Trainer's value when given)."""
        max_norm = gradient_clip_val if gradient_clip_val is not None else self.recipe.grad_clip_norm
        if max_norm:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA like Ultralytics' ``optimizer_step``."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    def on_train_epoch_end(self) -> None:
        """Per-epoch bookkeeping: YOLO26 loss weight decay and mosaic closing for the next epoch."""
        criterion = getattr(self.model, "criterion", None)
        if hasattr(criterion, "update"):
            criterion.update()
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "update_epoch"):
            datamodule.update_epoch(self.current_epoch + 1)

    # ------------------------------------------------------------------------------------- EMA, criterion
    def on_fit_start(self) -> None:
        """Create the EMA and the loss on the training device (restoring both when resuming)."""
        if self.recipe.ema:
            self.ema = ModelEMA(self.model, decay=self.recipe.ema_decay, tau=self.recipe.ema_tau)
            if self._pending_ema_state is not None:
                self._restore_ema(self._pending_ema_state)
        self._build_criterion()

    def _restore_ema(self, state: dict[str, Any]) -> None:
        assert self.ema is not None
        self.ema.ema.load_state_dict(state["state_dict"])
        self.ema.updates = state["updates"]
        self._pending_ema_state = None

    def _build_criterion(self) -> None:
        """Build the loss for this fit's epochs, as Ultralytics' trainer does (``model.args = trainer args``).

        YOLO26's ``E2ELoss`` decays its one-to-many weight from 0.8 to 0.1 over ``hyp.epochs - 1`` per-epoch
        updates; ``hyp`` is ``model.args``, whose default ``epochs`` (100) is not this run's. It is built after
        the EMA (which copies the model), like Ultralytics builds it lazily at the first loss.
        """
        epochs = int(self.trainer.max_epochs or 0)
        if epochs > 0:  # max_epochs=-1 (a max_steps run): the epoch count is unknown, keep Ultralytics' default
            self.model.args.epochs = epochs
        self.model.criterion = self.model.init_criterion()
        if int(self.trainer.world_size) > 1:  # each rank's loss: its share of the global batch's loss
            self.model.criterion = global_batch_loss(self.model.criterion)
        if self._pending_criterion_updates is not None:
            self._restore_criterion(self._pending_criterion_updates)

    def _restore_criterion(self, updates: int) -> None:
        """Continue the loss schedule after ``updates`` epochs (Ultralytics' resume: ``updates - 1``, then update)."""
        criterion = getattr(self.model, "criterion", None)
        if updates > 0 and hasattr(criterion, "update"):
            criterion.updates = updates - 1
            criterion.update()
        self._pending_criterion_updates = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the EMA weights next to the raw ones, and the loss schedule's position (YOLO26)."""
        if self.ema is not None:
            checkpoint["ema"] = {"state_dict": self.ema.ema.state_dict(), "updates": self.ema.updates}
        updates = getattr(getattr(self.model, "criterion", None), "updates", None)
        if updates is not None:
            checkpoint["criterion_updates"] = int(updates)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the EMA weights and loss schedule until ``on_fit_start`` builds them (or load them now)."""
        self._pending_ema_state = checkpoint.get("ema")
        self._pending_criterion_updates = checkpoint.get("criterion_updates")
        if self.ema is not None and self._pending_ema_state is not None:  # strategies that restore after setup
            self._restore_ema(self._pending_ema_state)
        if getattr(self.model, "criterion", None) is not None and self._pending_criterion_updates is not None:
            self._restore_criterion(self._pending_criterion_updates)

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA when there is one, else the raw model."""
        return self.ema.ema if self.ema is not None else self.model

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        """Build (or read from cache) the COCO ground truth of the whole val set."""
        self._val_detections = {}
        loader = self.trainer.val_dataloaders
        dataset = loader.dataset if hasattr(loader, "dataset") else loader[0].dataset
        self._val_ground_truth = coco_ground_truth(dataset, self.model.names)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Predict with the eval model and keep COCO detections per image."""
        if self._val_ground_truth is None:
            self.on_validation_epoch_start()
        model = self.eval_model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            detections = postprocess(model(self._to_float(batch)["img"]), end2end=uses_end2end_head(model))
        model.train(was_training)
        ids = {image["file_name"]: image["id"] for image in self._val_ground_truth["images"]}  # type: ignore[index]
        for detection in detections_to_coco(detections, batch, ids):
            self._val_detections.setdefault(detection["image_id"], []).append(detection)
        for file in batch["im_file"]:
            self._val_detections.setdefault(ids[file], [])

    def on_validation_epoch_end(self) -> None:
        """Gather detections from all ranks (dropping sampler padding duplicates) and log COCO mAP."""
        if self.trainer.sanity_checking or self._val_ground_truth is None:
            return
        merged = dict(self._val_detections)
        if world_size() > 1:
            gathered: list[Any] = [None] * world_size()
            dist.all_gather_object(gathered, self._val_detections)
            merged = {}
            for part in gathered:
                for image_id, dets in part.items():
                    merged.setdefault(image_id, dets)
        detections = [d for dets in merged.values() for d in dets]
        scores = coco_map(self._val_ground_truth, detections)
        # Every rank scored the same gathered detections: averaging identical values over ranks is exact, and
        # sync_dist=True keeps Lightning from warning that epoch-level values were not synchronised.
        self.log("val/map50_95", scores["map50_95"], prog_bar=True, sync_dist=True)
        self.log("val/map50", scores["map50"], sync_dist=True)
        self._val_detections = {}
