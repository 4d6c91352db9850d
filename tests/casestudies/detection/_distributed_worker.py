"""Top-level workers of the 2-process tests of :mod:`casestudies.detection.distributed` (started by
:func:`tests._distributed.spawn`).

Each rank computes its part of a global batch and saves what it got; the tests compare with one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests._distributed import init_env

#: Ultralytics' BatchNorm settings (``Conv``: eps 1e-3, momentum 0.03).
BN = {"eps": 1e-3, "momentum": 0.03}


def init(rank: int, world_size: int, port: int) -> None:
    init_env(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def batchnorm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 8 feature maps (mean 2, std 3) and the weights of a linear loss on the output."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, 5, generator=generator) * 3 + 2
    return x, torch.randn(8, 6, 5, 5, generator=generator)


def batchnorm_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank ``rank``'s slice of the batch through a GlobalBatchNorm2d and a plain BatchNorm2d, two steps each."""
    from casestudies.detection.distributed import GlobalBatchNorm2d

    init(rank, world_size, port)
    x, weights = batchnorm_inputs()
    part = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    for name, kind in (("global", GlobalBatchNorm2d), ("plain", nn.BatchNorm2d)):
        norm = kind(6, **BN)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
        local = x[part].clone().requires_grad_()
        out = norm(local)
        (out * weights[part]).sum().backward()
        norm(x[part] * 0.5)  # a second batch: the running statistics move again
        result = {
            "out": out.detach(),
            "input_grad": local.grad,
            "weight_grad": norm.weight.grad,
            "bias_grad": norm.bias.grad,
            "running_mean": norm.running_mean,
            "running_var": norm.running_var,
        }
        torch.save(result, Path(out_dir) / f"bn_{name}_rank{rank}.pt")
    dist.destroy_process_group()


def detection_batch(data_yaml: str, size: int) -> dict[str, Any]:
    """The first ``size`` training images of ``data_yaml`` without augmentation, as the LightningModule sees them."""
    from casestudies.detection.data import build_dataset, resolve_data

    data = resolve_data(data_yaml, allow_download=False)
    off = {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
    dataset = build_dataset(data, "train", 64, size, "train", rect=False, overrides=off)
    batch = dataset.collate_fn([dataset[i] for i in range(size)])
    return {**batch, "img": batch["img"].float() / 255}


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    keep = (batch["batch_idx"] >= start) & (batch["batch_idx"] < stop)
    return {
        "img": batch["img"][start:stop],
        "cls": batch["cls"][keep],
        "bboxes": batch["bboxes"][keep],
        "batch_idx": batch["batch_idx"][keep] - start,
    }


def detector(variant: str = "no_bn") -> nn.Module:
    """yolo11n without any BatchNorm (``scope="all"``): the images of a batch do not interact in the model."""
    from casestudies.detection.module import DetectorModule

    return DetectorModule("yolo11n.yaml", variant, num_classes=3, scope="all").model


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_rank(rank: int, world_size: int, port: int, data_yaml: str, out_dir: str) -> None:
    """DDP's gradient of one step, the mean over ranks of ``world_size * loss`` on each rank's slice: with the
    global-batch loss and with Ultralytics' own (each rank normalised by its own target scores)."""
    from casestudies.detection import offline
    from casestudies.detection.distributed import global_batch_loss

    offline.configure_offline()
    init(rank, world_size, port)
    batch, model = detection_batch(data_yaml, 8), detector()
    part = 8 // world_size
    for name in ("global", "per_rank"):
        model.criterion = model.init_criterion()
        if name == "global":
            model.criterion = global_batch_loss(model.criterion)
        loss, _ = model.loss(slice_batch(batch, rank * part, (rank + 1) * part))
        grads = gradients(model, loss.sum() * world_size)
        for grad in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(grad)
            grad /= world_size
        torch.save(grads, Path(out_dir) / f"loss_{name}_rank{rank}.pt")
    dist.destroy_process_group()
