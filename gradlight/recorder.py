"""The Trainer-free recorder: one object that owns one monitored run.

:class:`GradientFlowRecorder` ties together what a recorded run needs: the tracker that reads a step's
gradients (:class:`~gradlight.tracker.GradientFlowTracker`), the diagnosis, the activation taps, the
durable history, the findings file and the run info (all in one run folder, :mod:`gradlight.runfolder`),
and its own checkpoint state. It knows no trainer: a plain PyTorch loop, Lightning Fabric, the Lightning
callback (:class:`gradlight.GradientFlowMonitor`) and the trainer integrations
(:mod:`gradlight.integrations`) all drive it with the same three calls per optimizer step::

    recorder.capture(step, optimizer)   # after backward, before optimizer.step(): reads the gradients
    optimizer.step()
    recorder.end_step(loss)             # after the step: update ratios, loss, diagnosis, history

On steps that are not logged both calls return at once and no tensor work is done.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from gradlight import __version__
from gradlight.activations import ActivationStats, ActivationTaps, ForwardOriginTaps
from gradlight.amp import backward_scale_of, grad_scale_left
from gradlight.carry_probe import CarryProbe
from gradlight.diagnosis import (
    DiagnosisConfig,
    Finding,
    GradientAnomalyError,
    GradientDiagnosis,
    ModelProfile,
    resolve_actions,
)
from gradlight.diagnosis.detectors import ForwardSeen
from gradlight.forward_watch import ForwardWatch
from gradlight.history import HistoryWriter
from gradlight.layers import setup_problems
from gradlight.locate import announce_run_folder
from gradlight.options import RecorderOptions
from gradlight.runfolder import ActivationSiteInfo, FindingsWriter, LayerInfo, RunFolder, RunInfo
from gradlight.signal import BackwardSignalTaps, SignalStats, all_gather_reduction
from gradlight.stats import CrossRankReduction
from gradlight.tracker import GradientFlowTracker, StepRecord
from gradlight.validation import check_path, check_positive_number
from gradlight.wrappers import unwrap_model, unwrap_optimizer

__all__ = [
    "LOG_PREFIX",
    "Collectives",
    "GradientFlowRecorder",
    "HistoryExistsError",
]

#: Prefix of the summary metrics sent to loggers (:meth:`GradientFlowRecorder.summary_metrics`).
LOG_PREFIX = "gradflow"


class HistoryExistsError(FileExistsError):
    """The run folder already holds a history from another run (and ``overwrite`` is off)."""


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


@dataclass
class _Unwritten:
    """A finalized record waiting for its loss (it is emitted once the loss is known, or at the end)."""

    record: StepRecord
    activations: ActivationStats | None = None
    signal: SignalStats | None = None
    nonfinite_modules: list[str] | None = None  # forward-origin taps: modules whose outputs held NaN/Inf
    stream: str | None = None  # the optimizer that stepped (several optimizers: see _Optimizers)
    forward: ForwardSeen | None = None  # the watched modules that ran in the step's forward pass
    carried: bool | None = None  # whether the optimizer's previous gradient was still in this one (CarryProbe)


@dataclass
class _Optimizers:
    """What the recorder knows of the optimizers it captured: each one's stream key and last logged interval.

    With several optimizers (a GAN's generator and discriminator under manual optimization) the step counter
    counts every optimizer's steps, so one interval of ``log_every_n_steps`` steps holds steps of each: every
    optimizer is recorded at its first step in each interval, and the diagnosis keeps one state per
    optimizer (its stream, keyed by the name of its first monitored parameter).
    """

    keys: dict[int, str | None]  # id(optimizer) -> stream key
    intervals: dict[int, int]  # id(optimizer) -> last interval index recorded


class GradientFlowRecorder:
    r"""Records one model's per-layer gradient statistics, diagnosis and history; no trainer needed.

    One recorder owns one run folder (``save_dir``, see :mod:`gradlight.runfolder`): the history of
    every logged step (read it with :func:`gradlight.load_history`), the diagnosis findings
    (:func:`gradlight.load_findings`) and ``run.json`` (:func:`gradlight.runfolder.read_run_info`). Per
    optimizer step, call :meth:`capture` after ``backward()`` and before ``optimizer.step()``, then
    :meth:`end_step` after the step. Gradients are read at :meth:`capture`: pass them unscaled (call
    ``scaler.unscale_(optimizer)`` first, or pass ``grad_scale``) and before clipping. Depths follow the
    forward-execution order, found with hooks on the first forward pass after construction.

    Args:
        model: The model whose parameters are monitored (unwrapped: names come from ``named_parameters()``).
        save_dir: The run folder. ``None`` records in memory only (diagnosis and :attr:`latest`, no files).
        options: What to record and how (:class:`gradlight.RecorderOptions`, where each option is
            documented); ``None`` takes the defaults. With ``track_activations`` or ``track_backward_signal``
            call :meth:`start_step` before each micro-batch's forward pass. With ``on_anomaly="stop"`` a new
            warning finding sets :attr:`should_stop` (your loop checks it).
        reduction: How statistics combine across ranks (sharded models; see :mod:`gradlight.sharding`).
            ``None``: every rank holds whole gradients (single process, DDP).
        collectives: Cross-process operations; ``None`` takes them from ``torch.distributed`` if it is
            initialised.
        gradient_clip_val: The clip threshold your loop applies after :meth:`capture` (diagnosis and run
            info); ``None`` for no clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        loss_scaled: A dynamic loss scaler (fp16 AMP) skips steps that overflow: non-finite gradients are
            reported only when they persist. ``True`` by default when ``grad_scaler`` is given.
        grad_scaler: The ``torch.amp.GradScaler`` of an fp16 AMP loop: :meth:`capture` then divides out the
            scale the gradients still carry (none once ``scaler.unscale_(optimizer)`` ran).
        run_info: What ``run.json`` says about the trainer (``trainer``, ``strategy``, ``precision``,
            ``accumulate_grad_batches``, ``extra``, and ``world_size`` when only rank zero records); the
            recorder fills in the version, the interval, the clip settings, the world size (at least the
            collectives'), the layers and the activation sites.
        discover_forward_order: Install the forward-order hooks at construction. ``False`` waits for
            :meth:`start_step` (the Lightning callback: not during the sanity-check validation).
        warn: Called with the text of each ``warn``/``stop`` finding on rank zero; ``None`` uses
            :func:`warnings.warn`.
        **option_values: Options to set on top of ``options``, by name (``log_every_n_steps=10``); any field
            of :class:`gradlight.RecorderOptions`.

    Example:
        A plain PyTorch loop:

        >>> import tempfile
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> save_dir = tempfile.mkdtemp()
        >>> recorder = GradientFlowRecorder(model, save_dir, log_every_n_steps=2)
        >>> for step in range(4):
        ...     x, y = torch.randn(32, 8), torch.randn(32, 1)
        ...     loss = nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     logged = recorder.capture(step, optimizer)  # before the step: reads gradients if logged
        ...     optimizer.step()
        ...     findings = recorder.end_step(loss)  # after it: update ratios, loss, diagnosis, history
        ...     optimizer.zero_grad()
        >>> recorder.close()
        >>> from gradlight import load_history
        >>> history = load_history(save_dir)
        >>> sorted(history.step.unique().tolist()), sorted(history.layer.unique().tolist())
        ([0, 2], ['0', '2', '__global__'])
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str | Path | None,
        options: RecorderOptions | None = None,
        *,
        reduction: CrossRankReduction | None = None,
        collectives: Collectives | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = "norm",
        loss_scaled: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        run_info: RunInfo | None = None,
        discover_forward_order: bool = True,
        warn: Callable[[str], None] | None = None,
        **option_values: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        check_path("save_dir", save_dir)
        if gradient_clip_val is not None and not (
            isinstance(gradient_clip_val, (int, float)) and not isinstance(gradient_clip_val, bool)
        ):
            raise ValueError(f"`gradient_clip_val` must be a number or None, got {gradient_clip_val!r}.")
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(
                f"`gradient_clip_algorithm` must be 'norm', 'value' or None, got {gradient_clip_algorithm!r}."
            )
        self.options = options = RecorderOptions.build(options, **option_values)
        self.model = model
        self.folder: RunFolder | None = RunFolder(save_dir) if save_dir is not None else None
        if self.folder is not None:
            self.folder.check_usable()
        self.collectives = collectives if collectives is not None else Collectives.from_torch_distributed()
        self.tracker = GradientFlowTracker(
            model,
            group_by=options.group_by,
            exclude=options.exclude,
            track_update_ratio=options.track_update_ratio,
            update_method=options.update_method,
            update_kernel=options.update_kernel,
            edge_layers=options.edge_layers,
            reduction=reduction,
        )
        config = options.diagnosis if options.diagnosis is not None else DiagnosisConfig()
        self.diagnosis_config = config
        clip = float(gradient_clip_val) if gradient_clip_val else None
        self.diagnosis: GradientDiagnosis | None = (
            GradientDiagnosis(config, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)
            if options.diagnose
            else None
        )
        self.grad_scaler = grad_scaler
        self.loss_scaled = bool(loss_scaled) or grad_scaler is not None
        self.taps: ActivationTaps | None = None
        self._actions = resolve_actions(options.on_anomaly)
        template = (
            run_info
            if run_info is not None
            else RunInfo(gradlight_version=__version__, trainer="pytorch", log_every_n_steps=0)
        )
        self.run_info = replace(
            template,
            gradlight_version=__version__,
            log_every_n_steps=options.log_every_n_steps,
            gradient_clip_val=clip,
            gradient_clip_algorithm=gradient_clip_algorithm if clip else None,
            # a template's larger world: a trainer whose other ranks do not record (Ultralytics' DDP)
            world_size=max(template.world_size, self.collectives.world_size),
            model=template.model or type(model).__qualname__,
            layers=[],
            activation_sites=[],
        )
        self._warn = warn
        #: The last optimizer step recorded (``-1`` before the first); steps up to it are never recorded again.
        self.last_recorded_step = -1
        #: Records this recorder (or the run it resumes) appended to the history.
        self.records_written = 0
        #: Set when a finding's action is ``"stop"``: a loop that honours it ends the run.
        self.should_stop = False
        self._listeners: list[Callable[[StepRecord], None]] = []
        self._opened = False
        self._resumed = False
        self._writer: HistoryWriter | None = None
        self._findings_writer: FindingsWriter | None = None
        self._records_since_flush = 0
        self._unwritten: _Unwritten | None = None
        self._taps_step: int | None = None
        self.signal_taps: BackwardSignalTaps | None = None
        self._signal_step: int | None = None
        self._signal_scale = 1.0  # the loss scale the captured step's backward ran with (fp16 AMP)
        self._step_hooks: list[RemovableHandle] = []
        self._maximize = False
        self.origin_taps: ForwardOriginTaps | None = None
        self._origin_step: int | None = None
        self._module_layers: dict[str, tuple[str, int]] | None = None
        self._profiled = False
        self._profiled_map: object = None  # the layer map the diagnosis' profile was built from
        self._layers_written = 0  # layers in run.json when it was last written
        self._optimizers = _Optimizers({}, {})
        self._pending_stream: str | None = None
        self._forward_seen: ForwardSeen | None = None
        self._forward_watch: ForwardWatch | None = None
        self._watch_step: int | None = None
        self._carry_probes: dict[int, CarryProbe] = {}  # id(optimizer) -> probe started at its last record
        self._carried: bool | None = None  # what the captured optimizer's probe found
        self._carry_found: dict[int, bool | None] = {}  # id(optimizer) -> what its probe found
        self._missing_modules: dict[str | None, set[str]] = {}  # stream -> modules of its layers without gradient
        self._step_offset = 0  # added to the caller's step once it went back (an epoch loop's enumerate)
        self._last_step = -1  # the last step seen by start_step or capture, offset included
        self._step_went_back = False
        self._setup_checked = False
        if discover_forward_order:  # a plain loop: construction is its setup (a trainer's comes at open)
            self._check_setup()
            self.tracker.start_discovery()

    @classmethod
    def for_fabric(
        cls,
        fabric: Any,
        model: nn.Module,
        save_dir: str | Path | None,
        *,
        sharding: str | CrossRankReduction = "auto",
        **kwargs: Any,
    ) -> GradientFlowRecorder:
        """A recorder for a Lightning Fabric loop: ranks, collectives, AMP scaler and run info from ``fabric``.

        Call it on every rank after ``fabric.setup(...)`` and drive it as a plain loop, with
        ``fabric.backward(loss)`` for the backward pass. Under DDP every rank computes the same statistics
        from its already-averaged gradients with no extra collective, and rank zero writes the run folder.

        Args:
            fabric: The launched ``lightning.fabric.Fabric``.
            model: The model as returned by ``fabric.setup`` (its wrappers are looked through) or the
                original module.
            save_dir: The run folder.
            sharding: How statistics combine across ranks (see :mod:`gradlight.sharding`); ``"auto"``
                detects it from ``fabric.strategy``.
            **kwargs: Any other argument of :class:`GradientFlowRecorder`.

        Example:
            >>> import lightning as L
            >>> fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")  # doctest: +SKIP
            >>> fabric.launch()  # doctest: +SKIP
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> model, optimizer = fabric.setup(model, optimizer)  # doctest: +SKIP
            >>> loader = fabric.setup_dataloaders(loader)  # doctest: +SKIP
            >>> recorder = GradientFlowRecorder.for_fabric(fabric, model, "runs/fabric")  # doctest: +SKIP
            >>> for step, (x, y) in enumerate(loader):  # doctest: +SKIP
            ...     loss = nn.functional.mse_loss(model(x), y)
            ...     fabric.backward(loss)
            ...     recorder.capture(step, optimizer)
            ...     optimizer.step()
            ...     recorder.end_step(loss)
            ...     optimizer.zero_grad()
            ...     if recorder.should_stop:  # with on_anomaly="stop"
            ...         break
            >>> recorder.close()  # doctest: +SKIP
        """
        from gradlight.sharding import resolve_reduction

        strategy = fabric.strategy
        precision = getattr(strategy, "precision", None)
        collectives = Collectives.from_fabric(fabric)
        module = unwrap_model(model)
        kwargs.setdefault("grad_scaler", getattr(precision, "scaler", None))
        kwargs.setdefault(
            "run_info",
            RunInfo(
                gradlight_version=__version__,
                trainer="fabric",
                log_every_n_steps=0,
                strategy=type(strategy).__name__,
                precision=str(getattr(precision, "precision", "")),
                model=type(module).__qualname__,
            ),
        )
        return cls(
            module,
            save_dir,
            reduction=resolve_reduction(strategy, sharding),
            collectives=collectives,
            **kwargs,
        )

    # --------------------------------------------------------------------------------- public read access
    @property
    def save_dir(self) -> Path | None:
        """The run folder, or ``None`` when recording in memory only."""
        return None if self.folder is None else self.folder.root

    @property
    def interval(self) -> int:
        """The recording interval in optimizer steps."""
        return self.options.log_every_n_steps

    @property
    def latest(self) -> StepRecord | None:
        """The most recent record (on every rank), or ``None`` before the first logged step."""
        return self.tracker.latest

    @property
    def findings(self) -> list[Finding]:
        """Findings (warnings and notes) reported so far in this process (every rank), oldest first."""
        return [] if self.diagnosis is None else list(self.diagnosis.findings)

    @property
    def warnings_count(self) -> int:
        """Warning findings reported in this run (a resumed run includes the checkpoint's); the engine's count."""
        return 0 if self.diagnosis is None else self.diagnosis.findings_count

    @property
    def notes_count(self) -> int:
        """Note findings reported in this run (a resumed run includes the checkpoint's); the engine's count."""
        return 0 if self.diagnosis is None else self.diagnosis.notes_count

    def _continued_step(self, step: int) -> int:
        """The step as recorded: ``step``, or counted on from the last one when ``step`` went back.

        A step below the last one seen (or recorded) is not a step already taken: an epoch loop's
        ``enumerate(loader)`` restarts at 0. Its records are kept, numbered on from the last step, and
        the first time it happens a warning names both steps.
        """
        continued = step + self._step_offset
        floor = max(self._last_step, self.last_recorded_step)
        if continued < floor:
            self._step_offset += floor + 1 - continued
            if not self._step_went_back:
                self._step_went_back = True
                self._setup_warning(
                    f"gradlight: step {step} came after step {floor} (last recorded: {self.last_recorded_step}): "
                    "the step went back, as `enumerate(loader)` does at each epoch. Its records are kept and "
                    f"numbered on: step {step} is recorded as step {floor + 1}, and later restarts likewise. "
                    "Pass a step that keeps increasing over epochs (a counter of optimizer steps) to silence this."
                )
            continued = floor + 1
        self._last_step = max(self._last_step, continued)
        return continued

    def _check_setup(self) -> None:
        """Warn once, at setup, when nothing would be recorded, a pattern excludes nothing, or a history exists."""
        if self._setup_checked:
            return
        self._setup_checked = True
        if not self.collectives.is_global_zero:
            return
        for problem in setup_problems(self.model.named_parameters(), self.options.exclude):
            self._setup_warning(f"gradlight: {problem}")
        folder = self.folder
        if folder is not None and not self._opened and not self.options.overwrite and folder.has_history():
            self._setup_warning(
                f"gradlight: {str(folder.root)!r} already holds a history. To continue that run, call "
                "`load_state_dict` (or `resume_at`) before the first step; otherwise the first step raises "
                "HistoryExistsError: pass a new `save_dir` or `overwrite=True`."
            )

    def _setup_warning(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=4)

    def is_logged_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is recorded (not yet recorded and on the interval)."""
        return step % self.interval == 0 and step > self.last_recorded_step

    def add_listener(self, on_record: Callable[[StepRecord], None]) -> None:
        """Call ``on_record(record)`` on rank zero after each record is written (e.g. to send it to a logger).

        Example:
            >>> net = nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> recorder = GradientFlowRecorder(net, None, log_every_n_steps=1)
            >>> seen = []
            >>> recorder.add_listener(lambda record: seen.append(record.step))
            >>> for step in range(2):
            ...     net(torch.ones(4, 2)).sum().backward()
            ...     logged = recorder.capture(step, optimizer)
            ...     optimizer.step()
            ...     findings = recorder.end_step()
            ...     optimizer.zero_grad()
            >>> seen
            [0, 1]
        """
        self._listeners.append(on_record)

    def summary_metrics(self, record: StepRecord, per_layer: bool = False) -> dict[str, float]:
        """The small summary a logger gets for ``record``: ``gradflow/<global metric>`` and finding counts.

        Args:
            record: A record of this recorder.
            per_layer: Add ``gradflow/grad_l2/<layer>`` for every layer.

        Returns:
            Metric name -> value; ``gradflow/findings`` counts warnings and ``gradflow/notes`` notes when the
            diagnosis is on.
        """
        metrics = {f"{LOG_PREFIX}/{name}": float(value) for name, value in record.global_metrics.items()}
        if per_layer:
            for layer, value in zip(record.layers, record.metrics["grad_l2"]):
                metrics[f"{LOG_PREFIX}/grad_l2/{layer}"] = float(value)
        if self.diagnosis is not None:
            metrics[f"{LOG_PREFIX}/findings"] = float(self.warnings_count)
            metrics[f"{LOG_PREFIX}/notes"] = float(self.notes_count)
        return metrics

    # ----------------------------------------------------------------------------------------- run folder
    def open(self) -> None:
        """Check the run folder and open its writers (rank zero); every rank calls it (one broadcast).

        The first :meth:`start_step` or :meth:`capture` does it; call it earlier to fail early.

        Raises:
            HistoryExistsError: If ``save_dir`` holds a history of another run and ``overwrite`` is off (a run
                resumed with :meth:`load_state_dict` continues its history instead).
        """
        if self._opened:
            return
        self._opened = True
        self._check_setup()
        folder = self.folder
        if folder is None:
            return
        coll = self.collectives
        found = folder.has_history() if coll.is_global_zero else False
        if coll.broadcast is not None:
            found = bool(coll.broadcast(found))
        if found and not (self._resumed or self.records_written):
            if not self.options.overwrite:
                self._opened = False
                raise HistoryExistsError(
                    f"{str(folder.root)!r} already holds a gradlight history from another run. Pass a new "
                    "`save_dir`, resume that run (load the recorder's state_dict, or "
                    "`trainer.fit(..., ckpt_path=...)`), or set `overwrite=True` to replace it."
                )
            if coll.is_global_zero:
                folder.clear()
            if coll.broadcast is not None:
                coll.broadcast(True)  # the other ranks wait until rank zero has cleared the folder
        if coll.is_global_zero:
            # A resumed run recomputes every step after the checkpoint's last record: those rows supersede.
            self._writer = HistoryWriter(folder.root, start_step=self.last_recorded_step + 1)
            if self.diagnosis is not None:
                self._findings_writer = FindingsWriter(folder.root)
                self._findings_writer.touch()
            announce_run_folder(folder.root)

    def watch(self, optimizer: Optimizer) -> None:
        """Finish a captured step right after ``optimizer.step()`` (a step post-hook of ``optimizer``).

        Without it the step is finished by :meth:`end_step`; with it the update ratios are measured before
        anything else can change the parameters, and :meth:`end_step` only adds the loss.
        """
        raw = unwrap_optimizer(optimizer)
        self._step_hooks.append(raw.register_step_post_hook(self._after_optimizer_step))

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.tracker.pending and self.tracker.pending_owner() is optimizer:
            self.after_step()

    # ------------------------------------------------------------------------------------ one logged step
    def start_step(self, step: int) -> None:
        """Call before the forward pass of each micro-batch that feeds optimizer step ``step`` (optional).

        Starts the forward-order discovery if the order is not known yet and, with ``track_activations``,
        the activation taps on logged steps (idempotent over the micro-batches of one step).
        """
        self.open()
        step = self._continued_step(step)
        if self._forward_watch is not None and self._watch_step != step:
            self._forward_watch.reset()  # the first micro-batch of the step: what ran before is not this step
            self._watch_step = step
        if self.tracker.forward_order is None and not self.tracker.discovering:
            self.tracker.start_discovery()
        if self.options.track_activations and self.is_logged_step(step):
            if self.taps is None:  # built at first use: after lazy modules, configure_model and wrapping
                self.taps = ActivationTaps(
                    self.model,
                    saturation_derivative=self.diagnosis_config.saturation_derivative,
                    dead_min_samples=self.diagnosis_config.dead_min_samples,
                )
            self.taps.start()
            self._taps_step = step
        if self.options.track_backward_signal and self.is_logged_step(step):
            if self.signal_taps is None:  # built at first use, like the activation taps
                self.signal_taps = BackwardSignalTaps(self.model, group_by=self.options.group_by)
            self.signal_taps.start()  # idempotent over the micro-batches of one step
            self._signal_step = step
        if self.diagnosis is not None and self.diagnosis_config.forward_origin and self.is_logged_step(step):
            if self.origin_taps is None:  # built at first use, like the activation taps
                self.origin_taps = ForwardOriginTaps(self.model)
            self.origin_taps.start()  # where a NaN/Inf is born in forward, on logged steps only
            self._origin_step = step

    def pause_activations(self) -> None:
        """Stop the activation and forward-origin taps until the next :meth:`start_step` (e.g. for validation)."""
        if self.taps is not None:
            self.taps.stop()
        if self.origin_taps is not None:
            self.origin_taps.stop()

    def capture(
        self,
        step: int,
        optimizer: Optimizer | Iterable[Tensor],
        *,
        grad_scale: float | None = None,
        backward_scale: float | None = None,
    ) -> bool:
        """Read the gradients of optimizer step ``step`` if it is logged; call after backward, before the step.

        Args:
            step: The optimizer step (counting from 0; one per ``optimizer.step()``, whatever the accumulation).
            optimizer: The optimizer about to step (a torch, Lightning or Fabric optimizer), or the parameters.
            grad_scale: An AMP loss scale the gradients still carry; ``None`` asks the recorder's
                ``grad_scaler`` (see :func:`grad_scale_left`), 1.0 without one.
            backward_scale: The loss scale the backward passes of this step ran with (fp16 AMP). The backward
                signal (``track_backward_signal``) was tapped during them, so it carries this scale even when
                the gradients were unscaled since. ``None`` asks the recorder's ``grad_scaler`` (its current
                scale: call before ``scaler.update()``), else takes ``grad_scale``.

        Returns:
            Whether the step is being recorded (a second capture of the same step is ignored).

        Raises:
            ValueError: If ``step`` is not a non-negative int, or ``grad_scale`` or ``backward_scale`` not a positive
                finite number.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
        check_positive_number("grad_scale", grad_scale, allow_none=True)
        check_positive_number("backward_scale", backward_scale, allow_none=True)
        self.open()
        step = self._continued_step(step)
        tracker = self.tracker
        forward = self._forward_of_step()
        if tracker.discovering:
            tracker.stop_discovery()
            forward = ForwardSeen(
                frozenset(tracker.forward_order or [])
            )  # the discovery watched every module on this step
        if self.taps is not None:
            self.taps.stop()  # the forward passes of this step are over
        if self.signal_taps is not None:
            self.signal_taps.stop()  # and so are the backward passes: no hook stays between logged steps
        if self.origin_taps is not None:
            self.origin_taps.stop()
        if tracker.pending:
            if tracker.pending_step == step:
                return True  # already captured for this step (e.g. by the mixin under manual optimization)
            self.after_step()
        owner: Optimizer | None = None
        if isinstance(optimizer, Optimizer) or hasattr(optimizer, "param_groups"):
            owner = unwrap_optimizer(optimizer)
        probe = self._carry_probes.pop(id(owner), None) if owner is not None else None
        if probe is not None:  # the first step after the optimizer's last record tells
            self._carry_found[id(owner)] = probe.carried()
        if not self._is_logged_for(step, owner):
            return False
        params = (
            [p for group in owner.param_groups for p in group["params"]] if owner is not None else list(optimizer)  # type: ignore[arg-type]
        )
        scaler = self.grad_scaler
        if grad_scale is None:
            grad_scale = grad_scale_left(scaler, owner) if scaler is not None and owner is not None else 1.0
        if backward_scale is None:
            backward_scale = backward_scale_of(scaler) if scaler is not None else grad_scale
        self._signal_scale = float(backward_scale)
        tracker.capture(step, params, grad_scale=grad_scale, owner=owner)
        if self.diagnosis is not None and self._profiled_map is not tracker.layer_map:
            # Built at the first captured step (lazy modules have parameters only after a forward pass), and
            # again when a parameter frozen until now joined the layer map (another optimizer's network).
            config = self.diagnosis_config
            self.diagnosis.profile = ModelProfile.from_tracker(
                tracker, config.init_scale_tolerance, gain_threshold=config.gain_threshold
            )
            order = tracker.forward_order
            self.diagnosis.modules_run = set(order) if order is not None else None
            self.diagnosis.world_size = self.collectives.world_size
            self._profiled_map = tracker.layer_map
            self._module_layers = None
        self._profiled = True
        self._pending_stream = self._stream_of(owner)
        self._forward_seen = forward
        self._carried = self._carry_found.pop(id(owner), None)
        if owner is not None and self.diagnosis is not None:
            started = CarryProbe.start(params)
            if started is not None:
                self._carry_probes[id(owner)] = started
        # an optimizer that climbs the loss by design: the loss_rising finding names it
        self._maximize = owner is not None and any(bool(g.get("maximize")) for g in owner.param_groups)
        return True

    def _is_logged_for(self, step: int, owner: Optimizer | None) -> bool:
        """Whether ``owner``'s step ``step`` is recorded.

        On the interval, or its first step in an interval of ``log_every_n_steps`` steps once several
        optimizers were seen (see :class:`_Optimizers`).
        """
        if owner is None:
            return self.is_logged_step(step)
        known = self._optimizers
        key = id(owner)
        if key not in known.keys:
            known.keys[key] = None  # its stream key is read on its first recorded step
        interval = step // self.interval
        several = len(known.keys) > 1
        logged = self.is_logged_step(step) or (
            several and step > self.last_recorded_step and interval > known.intervals.get(key, -1)
        )
        if logged:
            known.intervals[key] = interval
        return logged

    def _stream_of(self, owner: Optimizer | None) -> str | None:
        """The diagnosis stream of ``owner``: the name of its first monitored parameter (stable over resumes)."""
        if owner is None:
            return None
        known = self._optimizers.keys
        key = known.get(id(owner))
        if key is None:
            layer_map = self.tracker.layer_map
            positions = (layer_map.params_by_id.get(id(p)) for group in owner.param_groups for p in group["params"])
            first = next((position for position in positions if position is not None), None)
            key = known[id(owner)] = layer_map.param_names[first] if first is not None else None
        return key

    def _forward_of_step(self) -> ForwardSeen | None:
        """What the forward watch saw since the last capture (then forgotten: the next step starts afresh)."""
        watch = self._forward_watch
        if watch is None:
            return None
        seen = ForwardSeen(frozenset(watch.ran), frozenset(watch.watched))
        watch.reset()
        return seen

    def _watch_missing(self, record: StepRecord, stream: str | None) -> None:
        """Watch the forward pass of the modules of layers without a gradient at their optimizer's last record."""
        self._missing_modules[stream] = {name.rpartition(".")[0] for names in record.missing.values() for name in names}
        modules = set().union(*self._missing_modules.values())
        watch = self._forward_watch
        if watch is not None and (not modules or modules - watch.watched):
            watch.remove()
            watch = self._forward_watch = None
        if modules and watch is None:
            self._forward_watch = ForwardWatch(self.model, modules)

    def after_step(self) -> StepRecord | None:
        """Finish the captured step after ``optimizer.step()``: update ratios and one host copy.

        :meth:`end_step` does this when it was not done; call it separately when the loss is known later.

        Returns:
            The step's record, or ``None`` if no step was captured.
        """
        if not self.tracker.pending:
            return None
        self._emit()  # a record still waiting for its loss goes out without it
        record = self.tracker.finalize()
        if self._maximize:
            record.global_metrics["optimizer_maximize"] = 1.0
        self.last_recorded_step = record.step
        self._unwritten = _Unwritten(
            record,
            self._finalize_taps(record.step),
            self._finalize_signal(record),
            nonfinite_modules=self._finalize_origin(record.step),
            stream=self._pending_stream,
            forward=self._forward_seen,
            carried=self._carried,
        )
        self._forward_seen = None
        return record

    def end_step(self, loss: float | Tensor | None = None, metrics: Mapping[str, float] | None = None) -> list[Finding]:
        """Close the step: attach ``loss`` to the record, diagnose it, write it, act on new findings.

        Call after ``optimizer.step()`` on every step (it returns at once on steps that are not logged). If
        the optimizer skipped its step (AMP overflow) the parameters did not move and the update ratio is 0.

        Args:
            loss: The step's training loss (a number or a one-element tensor), used by the ``dormant`` rule.
                Under several processes the ``loss`` row is its mean over the ranks that passed one (one
                small all-reduce on logged steps): the global-batch loss when the ranks' batches are equal.
            metrics: More run-wide values of the step for the history (e.g. a trainer's own clip norm).

        Returns:
            The findings reported at this step (warnings and notes).

        Raises:
            GradientAnomalyError: For a new warning finding whose action is ``"raise"``.
        """
        if self.tracker.pending:
            self.after_step()
        if self._unwritten is None:
            return []
        record = self._unwritten.record
        for name, extra in (metrics or {}).items():
            record.global_metrics[str(name)] = float(extra)
        value = _mean_over_ranks(self.collectives, _loss_value(loss), _device_of(self.model))
        if value is not None:
            record.global_metrics["loss"] = value
        return self._emit()

    def _emit(self, final: bool = False) -> list[Finding]:
        unwritten, self._unwritten = self._unwritten, None
        if unwritten is None:
            return []
        record, acts = unwritten.record, unwritten.activations
        findings = self._diagnose(record, acts, unwritten.signal, unwritten)
        if self.collectives.is_global_zero:
            self._write(record, acts)
            if unwritten.signal is not None and self._writer is not None:
                signal = unwritten.signal
                self._writer.append_step(signal.step, signal.blocks, signal.depths, signal.metrics)
            for listener in self._listeners:
                listener(record)
        if self.diagnosis is not None:
            self._act_on(findings, record.step, final)
        return findings

    def _diagnose(
        self,
        record: StepRecord,
        acts: ActivationStats | None,
        signal: SignalStats | None = None,
        unwritten: _Unwritten | None = None,
    ) -> list[Finding]:
        """Run the diagnosis on every rank with identical inputs; rank zero appends the findings."""
        if self.diagnosis is None:
            return []
        # Records are identical on every rank; the loss is each rank's own, and only the dormant rule reads
        # it. No collective for it: rank zero writes the findings, and raise / stop decisions are agreed.
        loss = record.global_metrics.get("loss")
        stream = unwritten.stream if unwritten is not None else None
        findings = self.diagnosis.update(
            record,
            acts,
            loss,
            loss_scaled=self.loss_scaled,
            signal=signal,
            nonfinite_modules=unwritten.nonfinite_modules if unwritten is not None else None,
            stream=stream,
            forward=unwritten.forward if unwritten is not None else None,
            grads_carried=unwritten.carried if unwritten is not None else None,
        )
        self._watch_missing(record, stream)
        if findings and self._findings_writer is not None:
            self._findings_writer.append(findings)
        return findings

    def _write(self, record: StepRecord, acts: ActivationStats | None) -> None:
        writer = self._writer
        if writer is None:
            return
        methods = self._update_methods()
        kernel = self.tracker.updates.kernel_info if self.tracker.updates is not None else None
        layers = len(self.tracker.layer_map.layers)  # grows when another optimizer's network joins the map
        if kernel is not None and kernel != self.run_info.extra.get("update_ratio_kernel"):
            self.run_info.extra["update_ratio_kernel"] = kernel  # fused, or eager and why (run.json)
            self._write_run_info(methods)
        elif (
            self.records_written == 0 or methods != self.run_info.update_ratio_methods or layers != self._layers_written
        ):
            self._write_run_info(methods)
        writer.append_step(record.step, record.layers, record.depths, record.metrics)
        writer.append_global(record.step, record.global_metrics)
        if acts is not None:
            writer.append_step(acts.step, acts.sites, acts.depths, acts.metrics)
        self.records_written += 1
        self._records_since_flush += 1
        if self._records_since_flush >= self.options.flush_every_n_records:
            self.flush()

    def _write_run_info(self, update_methods: dict[str, str]) -> None:
        assert self.folder is not None  # only called with a writer
        layer_map = self.tracker.layer_map
        self.run_info.layers = [
            LayerInfo(name, depth, size)
            for depth, (name, size) in enumerate(zip(layer_map.layers, layer_map.layer_sizes()))
        ]
        self.run_info.update_ratio_methods = update_methods
        self._layers_written = len(layer_map.layers)
        self.run_info.write(self.folder.root)

    def _update_methods(self) -> dict[str, str]:
        """How ``update_ratio`` got each param group's update so far (``{"0": "optimizer: AdamW (foreach)"}``)."""
        updates = self.tracker.updates
        return {} if updates is None else {group: how.describe() for group, how in updates.methods.items()}

    def _act_on(self, findings: list[Finding], step: int, final: bool) -> None:
        """Warn, stop or raise for new warning findings; raise/stop decisions are agreed across ranks."""
        coll = self.collectives
        actionable = [f for f in findings if f.is_warning]
        for finding in actionable:
            if self._actions[finding.kind] in ("warn", "stop") and coll.is_global_zero:
                self._emit_warning(
                    f"gradlight: {finding.message}. Likely cause: {finding.cause}. Remedy: {finding.remedy}."
                )
        if final:
            return  # the run is ending (or an exception is under way): no collectives, nothing to stop
        to_raise = [f for f in actionable if self._actions[f.kind] == "raise"]
        to_stop = [f for f in actionable if self._actions[f.kind] == "stop"]
        do_raise, do_stop = bool(to_raise), bool(to_stop)
        if coll.all_reduce_sum is not None and any(a in ("raise", "stop") for a in self._actions.values()):
            # Like EarlyStopping's reduce_boolean_decision: any rank's decision is every rank's (one op).
            device = _device_of(self.model)
            flags = coll.all_reduce_sum(torch.tensor([float(do_raise), float(do_stop)], device=device))
            do_raise, do_stop = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if not (do_raise or do_stop):
            return
        self.flush()  # the history up to this step is on disk before the run stops
        if do_raise:
            raise GradientAnomalyError(to_raise or actionable or findings)
        self.should_stop = True
        if coll.is_global_zero:
            kinds = ", ".join(sorted({f.kind for f in to_stop})) or "a finding on another rank"
            # The step after the reported one is the first not taken (Lightning's `global_step` at this point).
            self._emit_warning(f"gradlight: stopping the run at step {step + 1} ({kinds}).")

    def _emit_warning(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=4)

    # ------------------------------------------------------------------------------ activation statistics
    def _layers_of_modules(self) -> dict[str, tuple[str, int]]:
        """``module name -> (layer, depth)`` for the modules whose parameters are monitored."""
        if self._module_layers is None:
            layer_map = self.tracker.layer_map
            mapping: dict[str, tuple[str, int]] = {}
            for name, index in zip(layer_map.param_names, layer_map.param_layer):
                mapping.setdefault(name.rpartition(".")[0], (layer_map.layers[index], index))
            self._module_layers = mapping
        return self._module_layers

    def _finalize_taps(self, step: int) -> ActivationStats | None:
        """Activation statistics of ``step``: one all-reduce (every rank calls it) and one host copy."""
        taps = self.taps
        if taps is None or self._taps_step != step:
            return None
        taps.stop()
        self._taps_step = None
        if not taps.sites:
            return None
        stats = taps.finalize(
            step,
            self.collectives.all_reduce_sum,
            self._layers_of_modules(),
            default_depth=len(self.tracker.layer_map.layers),
        )
        if stats is not None and not self.run_info.activation_sites:
            self.run_info.activation_sites = [
                ActivationSiteInfo(site, kind, fed, int(depth))
                for site, kind, fed, depth in zip(stats.sites, stats.kinds, stats.feeds, stats.depths)
            ]
        return stats

    def _finalize_origin(self, step: int) -> list[str] | None:
        """The modules whose forward outputs held NaN/Inf on logged step ``step`` (``None`` if not tapped)."""
        taps = self.origin_taps
        if taps is None or self._origin_step != step:
            return None
        taps.stop()
        self._origin_step = None
        return taps.finalize(self.diagnosis_config.max_layers_in_evidence)

    def _finalize_signal(self, record: StepRecord) -> SignalStats | None:
        """Backward-signal statistics of ``record``'s step: one collective under several ranks, one host copy."""
        taps = self.signal_taps
        if taps is None or self._signal_step != record.step:
            return None
        taps.stop()
        self._signal_step = None
        world = self.collectives.world_size
        layer_map = self.tracker.layer_map
        return taps.finalize(
            record.step,
            all_gather_reduction() if world > 1 else None,
            grad_scale=self._signal_scale,
            data_parallel_size=world,
            depth_of={name: depth for depth, name in enumerate(layer_map.layers)},
        )

    # --------------------------------------------------------------------------------------------- closing
    def flush(self) -> None:
        """Write buffered records to disk now (rank zero; a no-op elsewhere)."""
        if self._writer is not None:
            self._writer.flush()
        self._records_since_flush = 0

    def close(self) -> None:
        """Emit a record still waiting for its loss, close the history, remove every hook. Idempotent.

        A step captured but never finished is dropped. The recorder can record again after :meth:`open`.
        """
        self.tracker.stop_discovery()
        self.tracker.discard()
        if self.taps is not None:
            self.taps.discard()
        if self.signal_taps is not None:
            self.signal_taps.discard()
        if self.origin_taps is not None:
            self.origin_taps.stop()
            self.origin_taps.finalize()
        self._emit(final=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._findings_writer = None
        self._opened = False
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        if self._forward_watch is not None:
            self._forward_watch.remove()
            self._forward_watch = None
        for probe in self._carry_probes.values():
            probe.stop()
        self._carry_probes.clear()

    def __enter__(self) -> GradientFlowRecorder:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same history and diagnosis (small, picklable).

        The history is flushed first: every record up to this state is on disk before a checkpoint holds
        it, so a run killed after the checkpoint and resumed from it loses no step.

        Example:
            >>> recorder = GradientFlowRecorder(nn.Linear(2, 1), None)
            >>> sorted(recorder.state_dict())  # doctest: +NORMALIZE_WHITESPACE
            ['diagnosis', 'forward_order', 'last_recorded_step', 'last_step', 'notes', 'records_written',
             'step_offset', 'version', 'warnings']
        """
        self.flush()
        order = self.tracker.forward_order
        return {
            "version": 1,
            "last_recorded_step": self.last_recorded_step,
            "last_step": self._last_step,
            "step_offset": self._step_offset,
            "records_written": self.records_written,
            "forward_order": list(order) if order is not None else None,
            "diagnosis": self.diagnosis.state_dict() if self.diagnosis is not None else None,
            "warnings": self.warnings_count,
            "notes": self.notes_count,
        }

    def resume_at(self, step: int) -> None:
        """Continue a run folder from optimizer step ``step`` when the recorder's own state was not saved.

        The history keeps the earlier records; rows it holds from ``step`` on are superseded by the new ones
        (a trainer resumed from an older checkpoint recomputes them). The diagnosis starts over. Prefer
        :meth:`load_state_dict` when the checkpoint can carry :meth:`state_dict`.

        Raises:
            ValueError: If ``step`` is not a non-negative int.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
        self._last_step, self._step_offset = step - 1, 0  # going back to `step` is a resume, not a restart
        if step == 0:
            return
        self.last_recorded_step = step - 1
        self._resumed = True

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the run of ``state_dict`` (from :meth:`state_dict`): call before the first step.

        Raises:
            ValueError: If the state was written by a newer gradlight.
        """
        version = int(state_dict.get("version", 1))
        if version > 1:
            raise ValueError(
                f"recorder state version {version} is newer than this gradlight reads (1): upgrade gradlight"
            )
        self.last_recorded_step = int(state_dict.get("last_recorded_step", -1))
        self._last_step = int(state_dict.get("last_step", -1))
        self._step_offset = int(state_dict.get("step_offset", 0))
        self.records_written = int(state_dict.get("records_written", 0))
        order = state_dict.get("forward_order")
        if order is not None:
            self.tracker.set_forward_order(list(order))
        diagnosis = self.diagnosis
        if diagnosis is not None:
            if state_dict.get("diagnosis"):
                diagnosis.load_state_dict(state_dict["diagnosis"])
            # The recorder's own counts, when the state has them; else (older states) the engine's, both alike.
            diagnosis.findings_count = int(state_dict.get("warnings", diagnosis.findings_count))
            diagnosis.notes_count = int(state_dict.get("notes", diagnosis.notes_count))
        self._resumed = True


def _loss_value(loss: float | Tensor | None) -> float | None:
    if isinstance(loss, Tensor):
        return float(loss.detach()) if loss.numel() == 1 else None
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    return None


def _mean_over_ranks(collectives: Collectives, value: float | None, device: torch.device) -> float | None:
    """``value`` averaged over the ranks that have one (every rank calls it on the same steps); local if alone."""
    if collectives.world_size == 1 or collectives.all_reduce_sum is None:
        return value
    pair = torch.tensor([value or 0.0, 0.0 if value is None else 1.0], dtype=torch.float64, device=device)
    total, count = collectives.all_reduce_sum(pair).tolist()
    return total / count if count > 0 else None


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the device of collective flags); CPU for a model without any."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
