"""What every case of the matrix shares: a plain-loop harness and the independent reference of each logged step.

The harness drives a :class:`gradlight.GradientFlowRecorder` the way the README tells a user to, counts the
optimizer steps itself (the steps the history must hold) and, at every logged step, computes each layer's
gradient L2 norm independently of gradlight: in float64, sparse gradients densified (so repeated indices
are summed), complex gradients through ``view_as_real`` (the norm of the magnitudes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.robustness.kinds import FEATURES, Kind
from benchmarks.robustness.precision import Precision
from gradlight import GradientFlowRecorder

#: Per logged step: layer -> squared gradient L2 norm.
References = dict[int, dict[str, float]]


def layer_of(name: str) -> str:
    """The layer (owning module) of a parameter name, as a user reads it: wrapper components dropped."""
    parts = [part for part in name.split(".") if part not in ("_orig_mod", "_forward_module")]
    return ".".join(parts[:-1]) or "(root)"


def gradient_squares(model: nn.Module, params: Sequence[Tensor]) -> dict[str, float]:
    """Each layer's squared gradient L2 norm over ``params`` that have a gradient, computed the plain way."""
    names = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, float] = {}
    for param in params:
        grad = param.grad
        if grad is None or not param.requires_grad or id(param) not in names:
            continue
        dense = grad.to_dense() if grad.is_sparse else grad
        real = torch.view_as_real(dense) if dense.is_complex() else dense
        layer = layer_of(names[id(param)])
        out[layer] = out.get(layer, 0.0) + float(real.double().pow(2).sum())
    return out


class Batches:
    """A fixed regression task: ``y = sin(x @ w)``, batches drawn from a seeded generator."""

    def __init__(self, seed: int = 0, batch: int = 16) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(FEATURES, 1, generator=self.generator)
        self.batch = batch

    def next(self) -> tuple[Tensor, Tensor]:
        x = torch.randn(self.batch, FEATURES, generator=self.generator)
        return x, torch.sin(x @ self.weight)


@dataclass
class Run:
    """What a case leaves behind for the invariants.

    Attributes:
        save_dir: The run folder.
        interval: The recorder's ``log_every_n_steps``.
        steps: Optimizer steps taken (the history's steps are the logged ones among ``0 .. steps - 1``).
        references: The independent per-layer squares of every logged step (the findings are read from disk).
        logged: The steps the documented logging rule records (:meth:`is_logged`), as the loop took them.
    """

    save_dir: Path
    interval: int
    steps: int = 0
    references: References = field(default_factory=dict)
    logged: set[int] = field(default_factory=set)
    _intervals: dict[int, set[int]] = field(default_factory=dict)  # id(optimizer) -> intervals it was logged in

    def is_logged(self, step: int, optimizer: object) -> bool:
        """The README's rule: every ``interval``-th step, and with several optimizers each one's first step in
        every interval of ``interval`` steps (so a network that steps on odd steps only is recorded too)."""
        intervals = self._intervals.setdefault(id(optimizer), set())
        index = step // self.interval
        logged = step % self.interval == 0 or (len(self._intervals) > 1 and index not in intervals)
        if logged:
            intervals.add(index)
            self.logged.add(step)
        return logged


@dataclass
class Harness:
    """One plain-loop run of one kind at one precision, with the recorder on (or off: the bare setup)."""

    kind: Kind
    precision: Precision
    run: Run
    record: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.batches = Batches(self.seed)
        self.model = self.build_model()
        self.scaler = self.precision.scaler()
        self.recorder: GradientFlowRecorder | None = None
        self.step = 0  # the optimizer step about to be taken (what the history numbers)

    def build_model(self) -> nn.Module:
        model = self.kind.build()
        if self.kind.warmup:
            with torch.no_grad():
                model(self.batches.next()[0])
        return model

    def start_recorder(self, **kwargs: Any) -> GradientFlowRecorder | None:
        if self.record:
            self.recorder = GradientFlowRecorder(
                self.model, self.run.save_dir, log_every_n_steps=self.run.interval, grad_scaler=self.scaler, **kwargs
            )
        return self.recorder

    def forward_loss(self, model: nn.Module | None = None, scale: float = 1.0) -> Tensor:
        x, y = self.batches.next()
        with self.precision.autocast():
            prediction = (model or self.model)(x)
        return nn.functional.mse_loss(prediction.float(), y) * scale

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, optimizer: Optimizer, loss: Tensor, user_step: int | None = None) -> None:
        """Capture (with the user's step number), step, end the step; the harness's own count goes up by one."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.run.is_logged(self.step, optimizer):
            self.run.references[self.step] = gradient_squares(self.model, params)
        recorder = self.recorder
        if recorder is not None:
            recorder.capture(self.step if user_step is None else user_step, optimizer)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        if recorder is not None:
            recorder.end_step(loss.detach())
        if self.scaler is not None:
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.run.steps = max(self.run.steps, self.step)

    def finish(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters in two halves by module (for two optimizers): the head's and the rest."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for name, p in trainable if layer_of(name).split(".")[-1] in ("head", str(_last_index(model)))]
    rest = [p for _, p in trainable if all(p is not h for h in head)]
    return rest, head


def _last_index(model: nn.Module) -> int:
    inner = getattr(model, "_orig_mod", model)
    return len(inner) - 1 if isinstance(inner, nn.Sequential) else -1


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python warnings a case raises on purpose (a lazy module's, Lightning's small-data notes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
