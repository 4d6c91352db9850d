"""Top-level models and 2-process workers for the diagnosis and activation-tap tests.

Workers are started with :func:`tests._distributed.spawn`, set the torch.distributed environment themselves
and build their own Trainer (``strategy="ddp"``), so pytest is never re-run in a child. Results go to JSON
files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests._distributed import init_env, spawn

__all__ = ["QUIET", "Regressor", "dataset", "ddp_actions_worker", "gradlight_warnings", "mlp", "spawn"]

QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


def mlp(
    depth: int = 12,
    width: int = 16,
    act: Callable[[], nn.Module] = nn.Sigmoid,
    bn: bool = False,
    he: bool = False,
    inputs: int = 8,
) -> nn.Sequential:
    """``depth`` Linear layers with an activation (and optional BatchNorm) between them."""
    layers: list[nn.Module] = []
    size = inputs
    for _ in range(depth - 1):
        linear = nn.Linear(size, width)
        if he:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        size = width
    layers.append(nn.Linear(size, 1))
    return nn.Sequential(*layers)


def dataset(samples: int = 256, inputs: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Regressor(L.LightningModule):
    """MSE regression around any net; records each step's loss; optional per-layer learning rates."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        batch_size: int = 32,
        lr_zero: tuple[str, ...] = (),
        samples: int = 256,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.batch_size = batch_size
        self.lr_zero = lr_zero
        self.samples = samples
        self.losses: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses[self.global_step] = float(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        frozen = [p for n, p in self.named_parameters() if n.rpartition(".")[0] in self.lr_zero]
        ids = {id(p) for p in frozen}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if frozen:
            groups.append({"params": frozen, "lr": 0.0})  # frozen by accident
        return torch.optim.SGD(groups, lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        data = dataset(self.samples)
        world = self.trainer.world_size
        if world > 1:
            sampler = DistributedSampler(data, world, self.trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


# ----------------------------------------------------------------------------------------- multi-process
def gradlight_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The ``gradlight:`` messages among ``caught``."""
    return [str(w.message) for w in caught if str(w.message).startswith("gradlight:")]


def ddp_actions_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Run 1: vanishing -> "stop" (other kinds warn). Run 2: a NaN injected at step 3 -> "raise". Run 3: a
    vanishing gradient that persists for 8 logged steps -> "warn". Also activation taps.

    Writes ``rank{rank}.json`` (what happened, identical on every rank) and ``warnings_rank{rank}.json``
    (the ``gradlight:`` warnings this rank emitted, per run).
    """
    init_env(rank, world, port)
    warnings.simplefilter("ignore")
    from gradlight import GradientAnomalyError, GradientFlowMonitor

    out = Path(folder)
    result: dict[str, Any] = {}
    emitted: dict[str, list[str]] = {}

    def ddp_trainer(max_steps: int, monitor: GradientFlowMonitor) -> L.Trainer:
        return L.Trainer(
            **QUIET, accelerator="cpu", devices=world, strategy="ddp", use_distributed_sampler=False,
            max_steps=max_steps, callbacks=[monitor],
        )  # fmt: skip

    def fit(name: str, trainer: L.Trainer, model: L.LightningModule) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(model)
            finally:
                emitted[name] = gradlight_warnings(caught)

    torch.manual_seed(0)
    model = Regressor(mlp(12), batch_size=16)
    monitor = GradientFlowMonitor(
        1, out / "stop", on_anomaly={"vanishing": "stop", "default": "warn"}, track_activations=True
    )
    trainer = ddp_trainer(12, monitor)
    fit("stop", trainer, model)
    result["stop_global_step"] = trainer.global_step
    result["stop_findings"] = [(f.kind, f.layer, f.step) for f in monitor.recorder.findings]
    result["stop_messages"] = [f.message for f in monitor.recorder.findings]

    torch.manual_seed(0)
    model = Regressor(mlp(4, act=nn.ReLU), batch_size=16)
    target = model.net[2].weight

    def poison(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if model.global_step == 3 else grad

    target.register_hook(poison)
    monitor = GradientFlowMonitor(1, out / "raise", on_anomaly={"non_finite": "raise", "default": "ignore"})
    trainer = ddp_trainer(12, monitor)
    try:
        fit("raise", trainer, model)
        result["raised"] = None
    except GradientAnomalyError as error:
        result["raised"] = [(f.kind, f.layer, f.step) for f in error.findings]
    result["raise_global_step"] = trainer.global_step

    torch.manual_seed(0)
    model = Regressor(mlp(12), batch_size=16)
    monitor = GradientFlowMonitor(1, out / "warn", on_anomaly="warn")
    trainer = ddp_trainer(8, monitor)
    fit("warn", trainer, model)
    result["warn_global_step"] = trainer.global_step
    result["warn_findings"] = [(f.kind, f.layer, f.step) for f in monitor.recorder.findings]
    result["warn_messages"] = [f.message for f in monitor.recorder.findings]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    (out / f"warnings_rank{rank}.json").write_text(json.dumps(emitted))
