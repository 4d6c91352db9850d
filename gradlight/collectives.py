"""The few cross-process operations a recorder needs, from whatever runs the processes.

:class:`Collectives` is built from ``torch.distributed``, a Lightning Trainer's strategy or a Fabric; a
single process needs none of its operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Collectives", "loss_value", "mean_over_ranks"]


@dataclass(frozen=True)
class Collectives:
    """The few cross-process operations a recorder needs, from whatever runs the processes.

    A single process needs none of them (the default). Under DDP every rank drives its own recorder with
    the same calls: gradients are already averaged, so the records are computed locally; rank zero
    writes; activation sums and raise/stop decisions are summed across ranks.

    Attributes:
        world_size: Number of processes.
        global_rank: This process's rank.
        all_reduce_sum: Sums a tensor over all ranks and returns the result (every rank calls it).
        broadcast: Returns rank zero's value of a picklable object (every rank calls it).

    Example:
        >>> Collectives().is_global_zero
        True
        >>> Collectives.from_torch_distributed().world_size  # torch.distributed not initialised here
        1
    """

    world_size: int = 1
    global_rank: int = 0
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    broadcast: Callable[[Any], Any] | None = None

    @property
    def is_global_zero(self) -> bool:
        """Whether this is rank zero (the rank that writes the run folder)."""
        return self.global_rank == 0

    @classmethod
    def from_torch_distributed(cls) -> Collectives:
        """The default process group of ``torch.distributed`` if it is initialised, else a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()

        def all_reduce_sum(tensor: Tensor) -> Tensor:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor

        def broadcast(obj: Any) -> Any:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        return cls(dist.get_world_size(), dist.get_rank(), all_reduce_sum, broadcast)

    @classmethod
    def from_fabric(cls, fabric: Any) -> Collectives:
        """From a launched Lightning ``Fabric``: its world size, rank, ``all_reduce`` and ``broadcast``.

        Example:
            >>> from lightning.fabric import Fabric
            >>> Collectives.from_fabric(Fabric(accelerator="cpu", devices=1)).world_size
            1
        """
        world_size = int(fabric.world_size)
        if world_size == 1:
            return cls()

        def all_reduce_sum(tensor: Tensor) -> Tensor:
            return fabric.all_reduce(tensor, reduce_op="sum")

        def broadcast(obj: Any) -> Any:
            return fabric.broadcast(obj, src=0)

        return cls(world_size, int(fabric.global_rank), all_reduce_sum, broadcast)

    @classmethod
    def from_lightning(cls, strategy: Any) -> Collectives:
        """From a Lightning Trainer's strategy (``trainer.strategy``) or a Fabric's (``fabric.strategy``)."""
        world_size = int(getattr(strategy, "world_size", 1) or 1)
        if world_size == 1:
            return cls()
        # The Trainer's strategies sum with `reduce`, Fabric's with `all_reduce`; both broadcast the same way.
        reduce = getattr(strategy, "all_reduce", None) or strategy.reduce

        def all_reduce_sum(tensor: Tensor) -> Tensor:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
                tensor = tensor.clone()  # one all-reduce: the strategies' `reduce` adds a barrier before it
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                return tensor
            return reduce(tensor, reduce_op="sum")

        def broadcast(obj: Any) -> Any:
            return strategy.broadcast(obj, src=0)

        return cls(world_size, int(strategy.global_rank), all_reduce_sum, broadcast)


def loss_value(loss: float | Tensor | None) -> float | None:
    """``loss`` as a float: a number, or a one-element tensor; ``None`` otherwise."""
    if isinstance(loss, Tensor):
        return float(loss.detach()) if loss.numel() == 1 else None
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    return None


def mean_over_ranks(collectives: Collectives, value: float | None, device: torch.device) -> float | None:
    """``value`` averaged over the ranks that have one (every rank calls it on the same steps); local if alone."""
    if collectives.world_size == 1 or collectives.all_reduce_sum is None:
        return value
    pair = torch.tensor([value or 0.0, 0.0 if value is None else 1.0], dtype=torch.float64, device=device)
    total, count = collectives.all_reduce_sum(pair).tolist()
    return total / count if count > 0 else None
