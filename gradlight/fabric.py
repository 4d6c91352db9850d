"""What a recorder takes from a launched Lightning Fabric: the module, ranks, sharding, AMP scaler, run info.

:meth:`gradlight.GradientFlowRecorder.for_fabric` builds a recorder from :func:`fabric_arguments`. Nothing
here imports Lightning: the Fabric is read through its attributes. A Fabric loop, on every rank::

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    recorder = GradientFlowRecorder.for_fabric(fabric, model, "runs/fabric")
    for step, (x, y) in enumerate(loader):
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
        if recorder.should_stop:  # with on_anomaly="stop"
            break
    recorder.close()
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradlight import __version__
from gradlight.collectives import Collectives
from gradlight.runfolder import RunInfo
from gradlight.stats import CrossRankReduction
from gradlight.wrappers import unwrap_model

__all__ = ["fabric_arguments"]


def fabric_arguments(
    fabric: Any, model: nn.Module, sharding: str | CrossRankReduction = "auto"
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The recorder arguments of a Fabric loop: the unwrapped module, fixed arguments and defaults.

    Args:
        fabric: The launched ``lightning.fabric.Fabric``.
        model: The model as returned by ``fabric.setup`` (its wrappers are looked through) or the original module.
        sharding: How statistics combine across ranks (see :mod:`gradlight.sharding`); ``"auto"`` detects it
            from ``fabric.strategy``.

    Returns:
        The module to monitor; ``reduction`` and ``collectives`` (fixed); ``grad_scaler`` and ``run_info``
        (defaults the caller's arguments override).

    Example:
        >>> from lightning.fabric import Fabric
        >>> module, fixed, defaults = fabric_arguments(Fabric(accelerator="cpu", devices=1), nn.Linear(2, 1))
        >>> sorted(fixed), defaults["run_info"].trainer, fixed["collectives"].world_size
        (['collectives', 'reduction'], 'fabric', 1)
    """
    from gradlight.sharding import resolve_reduction

    strategy = fabric.strategy
    precision = getattr(strategy, "precision", None)
    module = unwrap_model(model)
    run_info = RunInfo(
        gradlight_version=__version__,
        trainer="fabric",
        log_every_n_steps=0,
        strategy=type(strategy).__name__,
        precision=str(getattr(precision, "precision", "")),
        model=type(module).__qualname__,
    )
    fixed = {"reduction": resolve_reduction(strategy, sharding), "collectives": Collectives.from_fabric(fabric)}
    return module, fixed, {"grad_scaler": getattr(precision, "scaler", None), "run_info": run_info}
