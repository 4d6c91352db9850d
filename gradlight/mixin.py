"""``GradientFlowMixin``: lets a LightningModule shape what the monitor records and read it back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from gradlight.monitor import GradientFlowMonitor
from gradlight.spec import GradientFlowSpec

if TYPE_CHECKING:
    from gradlight.tracker import StepRecord

__all__ = ["GradientFlowMixin"]


class GradientFlowMixin:
    """Mix into a ``LightningModule`` to declare layer groups and read or record gradient statistics.

    Example:
        >>> import lightning as L
        >>> class Net(GradientFlowMixin, L.LightningModule):
        ...     def configure_gradient_flow(self):
        ...         return GradientFlowSpec(group_by=2, exclude=["head.*.bias"])
        ...
        ...     def training_step(self, batch, batch_idx):  # manual optimization
        ...         opt = self.optimizers()
        ...         self.manual_backward(self.loss(batch))
        ...         self.record_gradient_flow(opt)   # before stepping
        ...         opt.step()
        ...         opt.zero_grad()
    """

    def configure_gradient_flow(self) -> GradientFlowSpec | None:
        """Override to group parameters into layers or exclude some; ``None`` keeps the monitor's choice."""
        return None

    @property
    def gradient_flow_monitors(self) -> list[GradientFlowMonitor]:
        """Every :class:`~gradlight.GradientFlowMonitor` among the Trainer's callbacks, in callback order."""
        callbacks = trainer.callbacks if (trainer := _trainer_of(self)) is not None else []
        return [callback for callback in callbacks if isinstance(callback, GradientFlowMonitor)]

    @property
    def gradient_flow_monitor(self) -> GradientFlowMonitor:
        """The first :class:`~gradlight.GradientFlowMonitor` among the Trainer's callbacks.

        Raises:
            MisconfigurationException: If the module is not attached to a Trainer with a monitor.
        """
        monitors = self.gradient_flow_monitors
        if not monitors:
            raise MisconfigurationException(
                "No GradientFlowMonitor found: add one with `Trainer(callbacks=[GradientFlowMonitor()])`."
            )
        return monitors[0]

    @property
    def gradient_flow(self) -> StepRecord | None:
        """The first monitor's latest statistics (``StepRecord``), or ``None`` before the first logged step."""
        recorder = self.gradient_flow_monitor.recorder
        return None if recorder is None else recorder.latest

    def record_gradient_flow(self, optimizer: Any) -> None:
        """Record this step's gradients under manual optimization: call after backward, before ``step()``.

        Every monitor of the Trainer records (each on its own interval).

        Args:
            optimizer: The optimizer about to step (a ``LightningOptimizer`` or a torch optimizer).

        Raises:
            MisconfigurationException: If the module is not attached to a Trainer with a monitor.
        """
        raw = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(raw, Optimizer):
            raise ValueError(f"`optimizer` must be a torch or Lightning optimizer, got {type(optimizer).__name__}.")
        self.gradient_flow_monitor  # noqa: B018 - raises with a clear message when there is none
        trainer = _trainer_of(self)
        for monitor in self.gradient_flow_monitors:
            monitor.capture(trainer, raw)


def _trainer_of(module: object) -> Any:
    try:
        return getattr(module, "trainer", None)
    except RuntimeError:  # LightningModule.trainer raises when not attached
        return None
