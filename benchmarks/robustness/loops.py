"""The loop shapes of the robustness matrix: plain loops driving the recorder, Lightning ones driving the monitor.

A loop shape is a function ``(kind, precision, run, record) -> None`` that trains for :data:`STEPS` optimizer
steps (about), fills ``run`` (steps taken, references) and leaves the run folder behind. Adding a shape
is one entry in :data:`LOOPS`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.robustness.harness import Batches, Harness, Run, gradient_squares, quiet, split_parameters
from benchmarks.robustness.kinds import FEATURES, Kind
from benchmarks.robustness.precision import Precision
from gradlight import GradientFlowMonitor

#: Optimizer steps per case (the interval is 3: six logged steps, enough for a three-step patience; odd, so that
#: two optimizers taking turns each have logged steps).
STEPS = 18

LoopFn = Callable[[Kind, Precision, Run, bool], None]


@dataclass(frozen=True)
class Loop:
    """One loop shape: its function, its front end (``"recorder"`` or ``"monitor"``) and a line for the table."""

    name: str
    fn: LoopFn
    frontend: str = "recorder"
    what: str = ""


def one_optimizer(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    h = Harness(kind, precision, run, record)
    optimizer = kind.optimizer(h.model.parameters())
    h.start_recorder()
    for _ in range(STEPS):
        loss = h.forward_loss()
        h.backward(loss)
        h.optimizer_step(optimizer, loss)
    h.finish()


def accumulation(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    h = Harness(kind, precision, run, record)
    optimizer = kind.optimizer(h.model.parameters())
    h.start_recorder()
    for _ in range(STEPS):
        total = torch.zeros(())
        for _ in range(3):  # three micro-batches per optimizer step
            loss = h.forward_loss(scale=1 / 3)
            h.backward(loss)
            total = total + loss.detach()
        h.optimizer_step(optimizer, total)
    h.finish()


def epoch_loop(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """The README's ``enumerate(loader)`` inside an epoch loop: the user's step restarts at 0 every epoch."""
    h = Harness(kind, precision, run, record)
    optimizer = kind.optimizer(h.model.parameters())
    h.start_recorder()
    for _epoch in range(3):
        for step in range(STEPS // 3 + 1):  # 7 steps per epoch: epochs start off the interval too
            loss = h.forward_loss()
            h.backward(loss)
            h.optimizer_step(optimizer, loss, user_step=step)
    h.finish()


def kill_resume(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """Checkpoint every 5 steps; killed one step after the third checkpoint (never closed); resumed from it."""
    h = Harness(kind, precision, run, record)
    optimizer = kind.optimizer(h.model.parameters())
    h.start_recorder()
    checkpoint: dict[str, Any] = {}
    for _ in range(STEPS - 2):
        loss = h.forward_loss()
        h.backward(loss)
        h.optimizer_step(optimizer, loss)
        if h.step % 5 == 0:
            checkpoint = _checkpoint(h, optimizer)
    # Killed: the recorder is abandoned, never closed or flushed (its buffered records are lost as in a kill).
    resumed = Harness(kind, precision, run, record, seed=1)
    resumed.model.load_state_dict(checkpoint["model"])
    optimizer = kind.optimizer(resumed.model.parameters())
    optimizer.load_state_dict(checkpoint["optimizer"])
    if resumed.scaler is not None and checkpoint["scaler"] is not None:
        resumed.scaler.load_state_dict(checkpoint["scaler"])
    resumed.step = checkpoint["step"]
    recorder = resumed.start_recorder()
    if recorder is not None:
        recorder.load_state_dict(checkpoint["recorder"])
    for _ in range(resumed.step, STEPS):
        loss = resumed.forward_loss()
        resumed.backward(loss)
        resumed.optimizer_step(optimizer, loss)
    resumed.finish()


def _checkpoint(h: Harness, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in h.model.state_dict().items()},
        "optimizer": _deepcopy(optimizer.state_dict()),
        "scaler": h.scaler.state_dict() if h.scaler is not None else None,
        "step": h.step,
        "recorder": h.recorder.state_dict() if h.recorder is not None else None,
    }


def _deepcopy(state: Any) -> Any:
    return copy.deepcopy(state)


def two_alternating(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """Two optimizers taking turns (GAN-style), one step number per optimizer step (as Lightning counts)."""
    _two_optimizers(kind, precision, run, record, every=1)


def two_cadences(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """The body's optimizer every iteration, the head's every third."""
    _two_optimizers(kind, precision, run, record, every=3)


def _two_optimizers(kind: Kind, precision: Precision, run: Run, record: bool, every: int) -> None:
    h = Harness(kind, precision, run, record)
    body, head = split_parameters(h.model)
    body_optimizer, head_optimizer = kind.optimizer(body), torch.optim.Adam(head, lr=1e-3)
    h.start_recorder()
    iteration = 0
    while h.step < STEPS:
        loss = h.forward_loss()
        h.backward(loss)
        for p in head:
            p.grad = None  # this step belongs to the body's optimizer
        h.optimizer_step(body_optimizer, loss)
        if iteration % every == 0 and h.step < STEPS:
            loss = h.forward_loss()
            h.backward(loss)
            for p in body:
                p.grad = None
            h.optimizer_step(head_optimizer, loss)
        iteration += 1
    h.finish()


# ------------------------------------------------------------------------------------------------ Lightning
def lightning_automatic(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """``Trainer.fit`` with automatic optimization and the monitor."""
    _fit(kind, precision, run, record, manual=False, accumulate=1)


def lightning_accumulation(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """``Trainer(accumulate_grad_batches=3)`` with the monitor."""
    _fit(kind, precision, run, record, manual=False, accumulate=3)


def lightning_manual_two(kind: Kind, precision: Precision, run: Run, record: bool) -> None:
    """Manual optimization with two optimizers and ``toggle_optimizer`` (Lightning's GAN pattern)."""
    _fit(kind, precision, run, record, manual=True, accumulate=1)


def _fit(kind: Kind, precision: Precision, run: Run, record: bool, manual: bool, accumulate: int) -> None:

    torch.manual_seed(0)
    module = _LitCase(kind, manual)
    callbacks: list[pl.Callback] = []
    monitor = None
    if record:
        monitor = GradientFlowMonitor(save_dir=run.save_dir, log_every_n_steps=run.interval)
        callbacks.append(monitor)
    callbacks.append(_Reference(run))
    batches = STEPS * accumulate if not manual else STEPS // 2
    data = _dataset(batches)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=callbacks,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **precision.lightning(),
    )
    with quiet():
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    run.steps = trainer.global_step


def _dataset(batches: int) -> torch.utils.data.TensorDataset:
    source = Batches(0)
    xs, ys = zip(*(source.next() for _ in range(batches)))
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))


class _Reference(pl.Callback):
    """Computes the independent reference of every logged step, in the hook the monitor reads gradients in."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if self.run.is_logged(step, optimizer):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.run.references[step] = gradient_squares(pl_module, params)


class _LitCase(pl.LightningModule):
    """A kind's model in a LightningModule: one optimizer (automatic) or two toggled ones (manual)."""

    def __init__(self, kind: Kind, manual: bool) -> None:
        super().__init__()
        self.kind = kind
        self.net = kind.build()
        if kind.warmup:
            with torch.no_grad():
                self.net(torch.zeros(2, FEATURES))
        self.automatic_optimization = not manual

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if self.automatic_optimization:
            return nn.functional.mse_loss(self(x).float(), y)
        for optimizer in self.optimizers():
            self.toggle_optimizer(optimizer)
            loss = nn.functional.mse_loss(self(x).float(), y)
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            self.untoggle_optimizer(optimizer)
        return None

    def configure_optimizers(self) -> Any:
        if self.automatic_optimization:
            return self.kind.optimizer(self.parameters())
        body, head = split_parameters(self.net)
        return [self.kind.optimizer(body), torch.optim.Adam(head, lr=1e-3)]


#: Every loop shape, by name. Adding one is one entry.
LOOPS: dict[str, Loop] = {
    loop.name: loop
    for loop in (
        Loop("one_optimizer", one_optimizer, what="one optimizer, one capture per step"),
        Loop("accumulation", accumulation, what="3 micro-batches per optimizer step"),
        Loop("epoch_loop", epoch_loop, what="enumerate(loader) per epoch: the step restarts at 0"),
        Loop("kill_resume", kill_resume, what="state_dict every 5 steps, killed, resumed from the last"),
        Loop("two_alternating", two_alternating, what="two optimizers taking turns"),
        Loop("two_cadences", two_cadences, what="two optimizers, the second every 3rd iteration"),
        Loop("lightning", lightning_automatic, "monitor", what="Trainer.fit, automatic optimization"),
        Loop("lightning_accumulation", lightning_accumulation, "monitor", what="accumulate_grad_batches=3"),
        Loop("lightning_manual_two", lightning_manual_two, "monitor", what="manual optimization, toggle_optimizer"),
    )
}
