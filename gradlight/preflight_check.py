"""A check of one training step before training: :func:`preflight`.

It runs one (or a few) optimizer steps on one batch through a :class:`~gradlight.recorder.GradientFlowRecorder`
with every tap on and the diagnosis' patiences set to one step (:func:`preflight_config`), then puts the model and
the optimizer back as they were. The checks are the diagnosis' own findings, read as three questions (the ones
torchdiag's ``verify_step`` asks), plus whatever else the diagnosis saw on that step:

* **finite**: the loss, every gradient and every module's forward output are finite (no ``non_finite`` finding;
  one names where the NaN/Inf was born);
* **gradients**: every trainable parameter in the optimizer gets a gradient (no ``no_gradient`` finding);
* **moves**: the optimizer step changes the parameters (no ``stalled`` or ``dormant`` finding). A learning
  rate of exactly 0 everywhere is not reported: it is the first step of many warm-up schedules.

It uses the same detectors and rule table as training does; only the patiences differ, so that one step can
answer. Findings that need a history (a trend, a growth over a window, the loss rules) cannot show in one step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from gradlight.diagnosis import DiagnosisConfig, Finding
from gradlight.recorder import GradientFlowRecorder

__all__ = ["CHECKS", "PreflightReport", "preflight", "preflight_config"]

#: Each check and the finding kinds that fail it.
CHECKS: dict[str, tuple[str, ...]] = {
    "finite": ("non_finite",),
    "gradients": ("no_gradient",),
    "moves": ("stalled", "dormant"),
}


def preflight_config(config: DiagnosisConfig | None = None) -> DiagnosisConfig:
    """``config`` (default ``DiagnosisConfig()``) with every patience and window that gates a one-step check at 1.

    Example:
        >>> preflight_config().no_gradient_patience, preflight_config().stalled_window
        (1, 1)
    """
    base = config if config is not None else DiagnosisConfig()
    return replace(
        base, no_gradient_patience=1, stalled_window=1, dormant_window=1, activation_patience=1, forward_origin=True
    )


@dataclass
class PreflightReport:
    """What :func:`preflight` found.

    Attributes:
        loss: The loss of each step run.
        findings: The diagnosis' findings (warnings and notes), oldest first.
        checks: ``check -> passed`` for each of :data:`CHECKS`.
    """

    loss: list[float]
    findings: list[Finding] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether no warning was found (notes are allowed)."""
        return not any(f.is_warning for f in self.findings)

    def summary(self) -> str:
        """A few lines: one per check, then one per other warning or note."""
        lines = [f"gradlight preflight: {'ok' if self.ok else 'PROBLEMS FOUND'} (loss {self.loss})"]
        for check, passed in self.checks.items():
            lines.append(f"  [{'ok' if passed else 'FAIL'}] {check}")
        for finding in self.findings:
            lines.append(f"  {finding.severity} {finding.kind} at {finding.layer}: {finding.message}")
            lines.append(f"      cause: {finding.cause}")
            lines.append(f"      remedy: {finding.remedy}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def preflight(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    optimizer: Optimizer,
    *,
    steps: int = 1,
    config: DiagnosisConfig | None = None,
    restore: bool = True,
) -> PreflightReport:
    """Run ``steps`` training steps on ``batch`` with the diagnosis watching, then restore model and optimizer.

    Args:
        model: The model (in the state training will start from).
        batch: One batch, passed as is to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> loss``: the forward pass and the loss of one batch, as in the training
            loop (a LightningModule's ``lambda m, b: m.training_step(b, 0)`` when it returns the loss).
        optimizer: The optimizer training will use (its state is restored afterwards).
        steps: Optimizer steps to run on the batch (1 answers every check).
        config: Thresholds of the diagnosis; its patiences are set to one step (:func:`preflight_config`).
        restore: Put back the model's ``state_dict`` (parameters and buffers, e.g. BatchNorm statistics), its
            train/eval mode and the optimizer's ``state_dict`` afterwards.

    Returns:
        The report: ``report.ok``, ``report.checks``, ``report.findings``; ``print(report)`` for a summary.

    Raises:
        ValueError: If ``steps`` is not a positive int, ``model`` not a module or ``loss_fn`` not callable.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> batch = (torch.randn(16, 8), torch.randint(0, 2, (16,)))
        >>> def loss_fn(model, batch):  # the last layer is never called: its parameters get no gradient
        ...     x, y = batch
        ...     return nn.functional.cross_entropy(model[:3](x), y)
        >>> report = preflight(model, batch, loss_fn, optimizer)
        >>> report.ok, report.checks
        (False, {'finite': True, 'gradients': False, 'moves': True})
        >>> [f.kind for f in report.findings if f.is_warning]
        ['no_gradient']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), model.training)
    recorder = GradientFlowRecorder(
        model, None, log_every_n_steps=1, diagnosis=preflight_config(config), track_activations=True, warn=_quiet
    )
    losses: list[float] = []
    findings: list[Finding] = []
    try:
        model.train()
        for step in range(steps):
            loss, new = _one_step(recorder, model, batch, loss_fn, optimizer, step)
            losses.append(loss)
            findings += new
    finally:
        recorder.close()
        optimizer.zero_grad(set_to_none=True)
        if restore:
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            model.train(saved[2])
    checks = {check: not any(f.is_warning and f.kind in kinds for f in findings) for check, kinds in CHECKS.items()}
    return PreflightReport(losses, findings, checks)


def _one_step(
    recorder: GradientFlowRecorder,
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    optimizer: Optimizer,
    step: int,
) -> tuple[float, list[Finding]]:
    """One recorded step; the loss (NaN if ``loss_fn`` returned no scalar tensor) and the new findings."""
    optimizer.zero_grad(set_to_none=True)
    recorder.start_step(step)
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"`loss_fn` must return a one-element tensor (the loss), got {type(loss).__name__}.")
    loss.backward()
    recorder.capture(step, optimizer)
    optimizer.step()
    value = float(loss.detach())
    return (value if math.isfinite(value) else float("nan")), recorder.end_step(loss)


def _quiet(message: str) -> None:
    """The report carries the findings: no warning is emitted for them."""
