"""Train one zoo run with ``GradientFlowMonitor(log_every_n_steps=1)`` in a Lightning ``Trainer`` and score it.

Besides the verdict, every run is checked independently of the diagnosis, from its recorded history and
from a probe callback: a healthy run must train (its loss falls), a broken run must be broken the way its
expectation says (the detached layers' ``.grad`` is ``None`` on every step, the NaN appears at the onset
step in the named layer, the lr-0 group's updates are exactly zero, ...). A run whose check fails is a bug
in the catalog, not in the diagnosis, and is shown as such.

A task that declares :attr:`~zoo.tasks.Task.networks` (a GAN) trains under Lightning's manual optimization,
one optimizer per network, and makes its own steps (:meth:`~zoo.tasks.Task.manual_step`); the monitor is
attached the same way. Every optimizer step has its own step number, so the probe records which optimizer
took each step, and the score counts a layer's steps in those of the optimizer that owns it.
"""

from __future__ import annotations

import fnmatch
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradlight import GradientFlowMonitor, load_findings, load_history
from zoo.catalog import Optim, ZooRun
from zoo.faults import Clock
from zoo.scoring import ANY_LAYER, FIRST_LAYER, Streams, Verdict, score

__all__ = ["PREFIX", "Outcome", "ZooModule", "run_one"]

#: Attribute under which :class:`ZooModule` holds the bare model: every layer name starts with it.
PREFIX = "model."
#: Distinct micro-batches per run; longer runs cycle over them (epochs).
POOL = 32


class ZooModule(L.LightningModule):
    """A bare model trained on a task's loss with the run's optimizer (one per network of a manual task).

    Args:
        model: The bare model (layers are named ``model.<name>``).
        task: Has ``loss(model, batch)``.
        optim: The optimizer spec.
        clock: Advanced to ``trainer.global_step`` at the start of every batch (for faults with an onset).
        warmup_steps: Linear learning-rate warm-up over this many optimizer steps (0: none).
        decay_steps: Cosine decay reaching 0 at optimizer step ``decay_steps - 1`` (0: none).

    Example:
        >>> from zoo.tasks import ImageClassification
        >>> module = ZooModule(nn.Linear(2, 2), ImageClassification(), Optim(), Clock())
        >>> [name for name, _ in module.named_parameters()]
        ['model.weight', 'model.bias']
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        optim: Optim,
        clock: Clock,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        zero_grad: bool = True,
    ) -> None:
        super().__init__()
        #: Several networks, one optimizer each: the task makes its own steps (Lightning's manual optimization).
        self.automatic_optimization = not task.networks
        #: The losses of the last manual step (``training_step`` then returns nothing, as a user's GAN does).
        self.step_losses: dict[str, Tensor] = {}
        self.zero_grad_between_steps = zero_grad
        self.model = model
        self.task = task
        self.optim = optim
        self.clock = clock
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Advance the clock."""
        self.clock.step = self.trainer.global_step

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients, unless the run's regime is the forgotten-``zero_grad`` bug."""
        if self.zero_grad_between_steps:
            optimizer.zero_grad()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The task's loss; for a manual task, its own step (``zero_grad``, ``manual_backward``, ``step`` each)."""
        if self.automatic_optimization:
            return self.task.loss(self.model, batch)
        optimizers = self.optimizers()
        listed = optimizers if isinstance(optimizers, list) else [optimizers]
        self.step_losses = self.task.manual_step(self, batch, listed, self.zero_grad_between_steps)
        return None

    def configure_optimizers(self) -> Any:
        """Every parameter, frozen ones included, in the run's parameter groups; optional linear warm-up.

        A manual task gets one optimizer per network, in :attr:`~zoo.tasks.Task.networks` order, each built from
        the run's optimizer spec (parameter names relative to the bare model, e.g. ``generator.0.weight``).
        """
        if self.task.networks:
            return [
                self.optim.build([(f"{net}.{n}", p) for n, p in getattr(self.model, net).named_parameters()])
                for net in self.task.networks
            ]
        optimizer = self.optim.build([(n.removeprefix(PREFIX), p) for n, p in self.named_parameters()])
        if not self.warmup_steps and not self.decay_steps:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then (with ``decay_steps``) a cosine that is 0 at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.decay_steps:
            return 1.0
        span = max(1, self.decay_steps - 1 - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))


class Probe(Callback):
    """Records each micro-batch's losses, which optimizer took each step, and which trainable parameters had
    ``.grad is None`` on every step of the optimizer that holds them."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        #: The other losses of a manual step (a GAN's ``d_loss``), per micro-batch, by name.
        self.series: dict[str, list[float]] = {}
        #: ``(step, optimizer index)`` of every optimizer step.
        self.stepped: list[tuple[int, int]] = []
        self.steps = 0
        self._step = 0
        self._never: dict[int, set[str]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Remember the optimizer step this micro-batch belongs to (``global_step`` advances before batch end)."""
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        """Record the micro-batch's loss (a manual step's: the module's ``step_losses``) under its first step."""
        losses = outputs if isinstance(outputs, dict) else {"loss": outputs}
        if not module.automatic_optimization:  # the step returned nothing (Lightning passes ``{}`` or ``None``)
            losses = getattr(module, "step_losses", {})
        self.losses.append((self._step, float(losses["loss"].detach().float())))
        for name, value in losses.items():
            if name != "loss" and isinstance(value, Tensor):
                self.series.setdefault(name, []).append(float(value.detach().float()))

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        """Note which optimizer steps; intersect the set of its parameters without a gradient."""
        index = next(i for i, o in enumerate(trainer.optimizers) if o is getattr(optimizer, "optimizer", optimizer))
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        none = {n for n, p in module.named_parameters() if id(p) in own and p.requires_grad and p.grad is None}
        self._never[index] = self._never[index] & none if index in self._never else none
        self.stepped.append((trainer.global_step, index))
        self.steps += 1

    @property
    def never_grad(self) -> set[str] | None:
        """Trainable parameters whose ``.grad`` was ``None`` on every step of their optimizer (``None``: no step)."""
        return set().union(*self._never.values()) if self._never else None

    def streams(self, module: nn.Module, optimizers: list[Any]) -> Streams:
        """Each optimizer's steps, and the layers (modules owning parameters directly) each optimizer holds."""
        owner: dict[str, int] = {}
        for index, optimizer in enumerate(optimizers):
            own = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for name, child in module.named_modules():
                if any(id(p) in own for p in child.parameters(recurse=False)):
                    owner.setdefault(name, index)
        steps = tuple(tuple(sorted({s for s, i in self.stepped if i == index})) for index in range(len(optimizers)))
        return Streams(steps, owner)


@dataclass
class Outcome:
    """Everything the table shows about one run.

    Attributes:
        run: The catalog entry.
        verdict: The score of its findings.
        check_ok: Whether the independent check holds (healthy: it trains; broken: the fault is in effect).
        check: What the check measured, in words.
        seconds: Wall time of the run (building, training, scoring).
        loss_first: Loss of the first micro-batch.
        loss_last: Loss of the last micro-batch.
        error: ``"Type: message (file:line)"`` if the run crashed, else ``None``.
        findings: Every finding, summarised (kind, severity, layer, steps, message, scalar evidence).
    """

    run: ZooRun
    verdict: Verdict
    check_ok: bool
    check: str
    seconds: float
    loss_first: float = math.nan
    loss_last: float = math.nan
    error: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The diagnosis met the run's target (and the run did not crash)."""
        return self.error is None and self.verdict.passed


def _pretrain(model: nn.Module, task: Any, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for batch in task.batches(steps, generator):
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        optimizer.step()


def _build(run: ZooRun, clock: Clock) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    model = run.model()
    generator = torch.Generator().manual_seed(1)
    regime = run.regime
    if regime.pretrain_steps:
        _pretrain(model, run.task, regime.pretrain_steps, generator)
        modules = dict(model.named_modules())
        for name in regime.reset:
            for child in modules[name].modules():
                if hasattr(child, "reset_parameters"):
                    child.reset_parameters()
    for fault in run.faults:
        fault.apply(model, clock)
    for name, parameter in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in regime.freeze):
            parameter.requires_grad_(False)
    batches = run.task.batches(min(POOL, regime.steps) * regime.accumulate, generator)
    return model, batches


def _matches(name: str, patterns: tuple[str, ...], first_layer: str | None) -> bool:
    for pattern in patterns:
        if pattern == ANY_LAYER or (pattern == FIRST_LAYER and name == first_layer):
            return True
        if pattern not in (ANY_LAYER, FIRST_LAYER) and fnmatch.fnmatchcase(name, PREFIX + pattern):
            return True
    return False


def _table(history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` as a step x layer table (columns in depth order)."""
    rows = history[history.metric == metric]
    order = list(rows.groupby("layer")["depth"].min().sort_values().index)
    table = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="first")
    return table[order]


def _global(history: pd.DataFrame, metric: str, steps: tuple[int, ...] | None = None) -> np.ndarray:
    """A run-wide metric (``global_grad_l2``, ...) per logged step (of ``steps`` only, if given), in step order."""
    rows = history[history.metric == metric].sort_values("step")
    if steps is not None:
        rows = rows[rows.step.isin(steps)]
    return rows["value"].to_numpy(dtype=float)


def _growth(history: pd.DataFrame, streams: Streams) -> tuple[float, int | None]:
    """The largest finite global gradient norm over the first, per optimizer (the largest such ratio), and the
    first logged step with a non-finite gradient (``None`` if none)."""
    growth, nonfinite = 0.0, None
    for steps in streams.steps:
        norms = _global(history, "global_grad_l2", steps)
        finite = norms[np.isfinite(norms)]
        if len(norms) and len(finite):
            growth = max(growth, float(finite.max() / norms[0]))
    bad = history[(history.metric == "global_grad_nonfinite") & (history.value > 0)]
    if not bad.empty:
        nonfinite = int(bad.step.min())
    return growth, nonfinite


def _check(
    run: ZooRun,
    history: pd.DataFrame,
    probe: Probe,
    first_layer: str | None,
    owners: list[str],
    model: nn.Module,
    streams: Streams,
) -> tuple[bool, str]:
    """Check, without the diagnosis, that the run is healthy or broken as its expectation says.

    ``owners`` are the full names of the modules that directly own trainable parameters; ``model`` is the
    trained bare model.
    """
    expect, kind = run.expect, run.expect.kind
    if expect.healthy:
        losses = pd.DataFrame(probe.losses, columns=["step", "loss"]).groupby("step")["loss"].mean()
        trained, text = run.task.healthy(model, losses.tolist(), probe.series)
        clip = run.regime.gradient_clip_val
        if clip is not None:
            norms = _global(history, "global_grad_l2")
            text += f"; pre-clip norm > clip on {int((norms > clip).sum())}/{len(norms)} steps"
        return trained, text
    if kind == "vanishing":
        row = _table(history, "grad_l2").loc[expect.onset].to_numpy(dtype=float)
        ratio = float(row[0] / math.sqrt(row[-1] * row[-2]))
        return ratio < 1e-3, f"first/last-2 grad {ratio:.1e} at step {expect.onset}"
    if kind == "exploding":
        growth, nonfinite = _growth(history, streams)
        trace = [loss for _, loss in probe.losses]
        rise = trace[-1] / trace[0] if trace and trace[0] > 0 else 1.0
        text = f"global grad x{growth:.1e}, loss x{rise:.1e} over the run"
        text += f", NaN/Inf from step {nonfinite}" if nonfinite else ""
        return growth >= 100 or nonfinite is not None or (growth >= 2 and rise >= 3), text
    if kind == "non_finite":
        counts = _table(history, "grad_nonfinite")
        rows_bad = (counts.to_numpy(dtype=float) > 0).any(axis=1)
        first_bad = int(counts.index[int(np.argmax(rows_bad))]) if rows_bad.any() else None
        at_onset = counts.loc[expect.onset].to_dict() if expect.onset in counts.index else {}
        with_bad = [str(layer) for layer, count in at_onset.items() if count > 0]  # depth order
        deepest = with_bad[-1] if with_bad else None
        ok = first_bad == expect.onset and deepest is not None and _matches(deepest, expect.layers, first_layer)
        return ok, f"first NaN/Inf at step {first_bad}, deepest layer with it {deepest}"
    if kind == "dormant":
        updates = _table(history, "update_ratio")
        picked = [c for c in updates.columns if _matches(str(c), expect.layers, first_layer)]
        still = float(updates[picked].to_numpy(dtype=float).max())
        median = float(np.median(updates.to_numpy(dtype=float)))
        return still == 0.0, f"update ratio of those layers max {still:.1e}, median layer {median:.1e}"
    if kind == "stalled":
        ratios = _table(history, "update_ratio").to_numpy(dtype=float)
        median = float(np.median(ratios, axis=1).max())
        return median < 1e-8, f"median layer update ratio <= {median:.1e}, largest {ratios.max():.1e}"
    if kind == "no_gradient":
        never = probe.never_grad or set()
        expected = [c for c in owners if _matches(c, expect.layers, first_layer)]
        covered = [c for c in expected if any(n.startswith(c + ".") for n in never)]
        return bool(expected) and len(covered) == len(expected), (
            f"{len(never)} trainable tensors .grad None on every step of their optimizer ({probe.steps} steps); "
            f"{len(covered)}/{len(expected)} expected layers among them"
        )
    if kind in ("dead_units", "saturated"):
        metric = "act_dead" if kind == "dead_units" else "act_saturation"
        acts = _table(history, metric)
        sites = [c for c in acts.columns if _matches(str(c), expect.layers, first_layer)]
        worst = float(acts[sites].iloc[0].max()) if sites else math.nan
        return worst >= 0.5, f"{metric} {worst:.2f} at the first step, worst expected site"
    return False, f"no check for {kind!r}"


def _layer_names(history: pd.DataFrame) -> list[str]:
    rows = history[(history.metric == "grad_l2") & (history.depth >= 0)]
    return list(rows.groupby("layer")["depth"].min().sort_values().index)


def _owners(module: nn.Module) -> list[str]:
    """Names of the modules that directly own trainable parameters."""
    return [
        name for name, child in module.named_modules() if any(p.requires_grad for p in child.parameters(recurse=False))
    ]


def run_one(run: ZooRun, root: Path) -> Outcome:
    """Train ``run`` with the monitor under ``root / run.name`` and score its findings.

    Returns:
        The :class:`Outcome`; a crash (in the monitor, the model or the harness) becomes a failed outcome
        with the error, so one run cannot stop the zoo.
    """
    save_dir = root / run.name / "gradlight"
    start = time.perf_counter()
    probe = Probe()
    try:
        clock = Clock()
        model, batches = _build(run, clock)
        module = ZooModule(
            model,
            run.task,
            run.regime.optim,
            clock,
            warmup_steps=run.regime.warmup_steps,
            decay_steps=run.regime.steps if run.regime.decay_to_zero else 0,
            zero_grad=run.regime.zero_grad,
        )
        monitor = GradientFlowMonitor(
            log_every_n_steps=1,
            save_dir=save_dir,
            overwrite=True,
            track_activations=run.regime.track_activations,
            log_figures_every_n_epochs=None,
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=run.regime.steps,
            max_epochs=-1,
            precision=run.regime.precision,  # type: ignore[arg-type]
            gradient_clip_val=run.regime.gradient_clip_val,
            accumulate_grad_batches=run.regime.accumulate,
            callbacks=[monitor, probe],
            logger=False,
            default_root_dir=root / run.name,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the monitor's finding warnings: the findings file has them
            trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))  # type: ignore[arg-type]
        findings = load_findings(save_dir)
        history = load_history(save_dir)
        layers = _layer_names(history)
        first_layer = layers[0] if layers else None
        streams = probe.streams(module, trainer.optimizers)
        verdict = score(findings, run.expect, first_layer=first_layer, prefix=PREFIX, streams=streams)
        check_ok, check = _check(run, history, probe, first_layer, _owners(module), model, streams)
        losses = [loss for _, loss in probe.losses]
        return Outcome(
            run,
            verdict,
            check_ok,
            check,
            time.perf_counter() - start,
            loss_first=losses[0] if losses else math.nan,
            loss_last=losses[-1] if losses else math.nan,
            findings=[_finding_summary(row) for _, row in findings.iterrows()],
        )
    except Exception as error:  # a crash is a result of the benchmark, not the end of it
        frames = traceback.extract_tb(error.__traceback__)
        ours = [f for f in frames if "/gradlight/" in f.filename or "/zoo/" in f.filename]
        where = (ours or frames)[-1]
        message = f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
        return Outcome(
            run,
            Verdict(False, f"crashed: {message}"),
            False,
            "crashed",
            time.perf_counter() - start,
            error=message,
        )


def _finding_summary(row: pd.Series) -> dict[str, Any]:
    keys = ("kind", "severity", "layer", "step", "reported_step", "message")
    summary = {key: row[key] for key in keys if key in row.index}
    summary.setdefault("severity", "warning")
    summary["step"], summary["reported_step"] = int(summary["step"]), int(summary["reported_step"])
    evidence = row.get("evidence")
    if isinstance(evidence, dict):
        summary["evidence"] = {k: v for k, v in evidence.items() if isinstance(v, (int, float, str, bool))}
    return summary
