"""Small LightningModules shared by the gradlight tests (top-level so spawned workers can import them)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradlight import GradientFlowMixin


def sigmoid_mlp(depth: int = 10, width: int = 16, inputs: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
    )


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(x.shape[0], -1, 4))
        return self.head(out[:, -1])


def make_net(kind: str) -> nn.Module:
    if kind == "mlp":
        return sigmoid_mlp()
    if kind == "cnn":
        return bn_cnn()
    if kind == "lstm":
        return LSTMRegressor()
    raise ValueError(kind)


def make_dataset(kind: str = "mlp", samples: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(samples, 3, 8, 8, generator=generator)
        if kind == "cnn"
        else torch.randn(samples, 8, generator=generator)
    )
    y = x.flatten(1).sum(1, keepdim=True).gt(0).float()
    return TensorDataset(x, y)


class Net(GradientFlowMixin, L.LightningModule):
    """A regression/classification module around one of the nets above."""

    def __init__(
        self,
        kind: str = "mlp",
        lr: float = 0.1,
        batch_size: int = 16,
        samples: int = 96,
        optimizer: str = "sgd",
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        self.net = make_net(kind)
        self.lr = lr
        self.batch_size = batch_size
        self.samples = samples
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam_fused":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        dataset = make_dataset(self.kind, self.samples)
        world = self.trainer.world_size
        if world > 1:  # rank r takes rows r, r+W, ...: the same global batches as one process
            sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)


class ReferenceNorms(Callback):
    """Per-module gradient statistics computed the slow, obvious way, for comparison."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.records: dict[int, dict[str, dict[str, float]]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step % self.every:
            return
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = scaler.get_scale()
        per_layer: dict[str, dict[str, float]] = {}
        for name, module in pl_module.named_modules():
            grads = [p.grad.double().flatten() / scale for p in module.parameters(recurse=False) if p.grad is not None]
            params = [p.detach().double().flatten() for p in module.parameters(recurse=False) if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat(grads)
            per_layer[name] = {
                "grad_l2": float(flat.norm()),
                "grad_max_abs": float(flat.abs().max()),
                "param_l2": float(torch.cat(params).norm()),
            }
        self.records[trainer.global_step] = per_layer
