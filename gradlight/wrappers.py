"""The user's objects inside the wrappers that trainers put around them (Lightning, Fabric, DDP)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["unwrap_model", "unwrap_optimizer"]


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
