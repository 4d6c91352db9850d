"""The user's objects inside the wrappers that trainers put around them (Lightning, Fabric, DDP)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["device_of", "optimizer_and_params", "unwrap_model", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a Lightning ``LightningOptimizer`` or Fabric ``_FabricOptimizer``."""
    raw = optimizer
    while not isinstance(raw, Optimizer) and hasattr(raw, "optimizer"):
        raw = raw.optimizer
    if not isinstance(raw, Optimizer):
        raise ValueError(f"`optimizer` must be a torch, Lightning or Fabric optimizer, got {type(optimizer).__name__}.")
    return raw


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's ``_FabricModule`` and ``DistributedDataParallel`` wrappers."""
    while True:
        inner = getattr(model, "module", None)
        wrapped = hasattr(model, "_forward_module") or isinstance(model, nn.parallel.DistributedDataParallel)
        if not (wrapped and isinstance(inner, nn.Module)):
            return model
        model = inner  # Fabric's wrapper and DDP keep the user's module as `.module`


def optimizer_and_params(optimizer: Optimizer | Iterable[Tensor]) -> tuple[Optimizer | None, list[Tensor]]:
    """The torch optimizer behind ``optimizer`` (``None`` for bare parameters) and its parameters."""
    if isinstance(optimizer, Optimizer) or hasattr(optimizer, "param_groups"):
        owner = unwrap_optimizer(optimizer)
        return owner, [p for group in owner.param_groups for p in group["params"]]
    return None, list(optimizer)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the device of collective flags); CPU for a model without any."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
