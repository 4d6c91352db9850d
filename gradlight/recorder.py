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
from gradlight.activations import ActivationStats, ActivationTaps
from gradlight.adaptive import adaptive_decay
from gradlight.amp import step_scales
from gradlight.anomaly import AnomalyPolicy
from gradlight.collectives import Collectives, loss_value, mean_over_ranks
from gradlight.diagnosis import (
    DiagnosisConfig,
    Finding,
    GradientDiagnosis,
    ModelProfile,
    resolve_actions,
)
from gradlight.diagnosis.detectors import ForwardSeen
from gradlight.layers import setup_problems
from gradlight.optimizers import OptimizerStreams
from gradlight.options import RecorderOptions
from gradlight.runfolder import LayerInfo, RunFolder, RunInfo
from gradlight.runwriter import HistoryExistsError, RunFolderWriter
from gradlight.signal import BackwardSignalTaps, SignalStats
from gradlight.stats import CrossRankReduction
from gradlight.steps import StepCounter
from gradlight.steptaps import StepTaps
from gradlight.tracker import GradientFlowTracker, StepRecord
from gradlight.validation import check_clip, check_path, check_positive_number, check_step
from gradlight.wrappers import device_of, optimizer_and_params, unwrap_optimizer

__all__ = [
    "LOG_PREFIX",
    "Collectives",
    "GradientFlowRecorder",
    "HistoryExistsError",
]

#: Prefix of the summary metrics sent to loggers (:meth:`GradientFlowRecorder.summary_metrics`).
LOG_PREFIX = "gradflow"


@dataclass
class _Unwritten:
    """A finalized record waiting for its loss (it is emitted once the loss is known, or at the end)."""

    record: StepRecord
    activations: ActivationStats | None = None
    signal: SignalStats | None = None
    nonfinite_modules: list[str] | None = None  # forward-origin taps: modules whose outputs held NaN/Inf
    captured: _Captured | None = None


@dataclass
class _Captured:
    """What the recorder knows of a captured step besides its gradients (several optimizers, no_gradient, carry)."""

    stream: str | None = None  # the optimizer that stepped (see gradlight.optimizers)
    forward: ForwardSeen | None = None  # the watched modules that ran in the step's forward pass
    carried: bool | None = None  # whether the optimizer's previous gradient was still in this one (CarryProbe)
    maximize: bool = False  # an optimizer that climbs the loss by design: the loss_rising finding names it
    adaptive: dict[str, float] | None = None  # layers it steps per element (Adam family): decoupled decay rate


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
        check_clip(gradient_clip_val, gradient_clip_algorithm)
        self.options = options = RecorderOptions.build(options, **option_values)
        self.model = model
        self.folder: RunFolder | None = RunFolder(save_dir) if save_dir is not None else None
        if self.folder is not None:
            self.folder.check_usable()
        self.collectives = collectives if collectives is not None else Collectives.from_torch_distributed()
        self.tracker = _tracker(model, options, reduction)
        self.diagnosis_config = config = options.diagnosis if options.diagnosis is not None else DiagnosisConfig()
        clip = float(gradient_clip_val) if gradient_clip_val else None
        self.diagnosis: GradientDiagnosis | None = None
        if options.diagnose:
            self.diagnosis = GradientDiagnosis(
                config, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm
            )
        self.grad_scaler = grad_scaler
        self.loss_scaled = bool(loss_scaled) or grad_scaler is not None
        #: The activation, forward-origin and backward-signal taps of logged steps.
        self.step_taps = StepTaps.from_options(model, options, config)
        self.run_info = _recorded_run_info(run_info, options, clip, gradient_clip_algorithm, self.collectives, model)
        self._warn = warn
        #: Which steps are recorded; the last one recorded.
        self.steps = StepCounter(options.log_every_n_steps, self._setup_warning)
        #: Warns, stops or raises for new warning findings (see :attr:`should_stop`).
        self.anomaly = AnomalyPolicy(resolve_actions(options.on_anomaly), self.collectives, warn)
        #: The run folder's writer (rank zero writes; a no-op without ``save_dir``).
        self.writer = RunFolderWriter(
            self.folder, self.collectives, options.flush_every_n_records, options.diagnose, options.overwrite
        )
        #: What the recorder knows of each optimizer it captured (several optimizers: one stream each).
        self.optimizers = OptimizerStreams()
        self._init_state()
        if discover_forward_order:  # a plain loop: construction is its setup (a trainer's comes at open)
            self._check_setup()
            self.tracker.start_discovery()

    def _init_state(self) -> None:
        self._listeners: list[Callable[[StepRecord], None]] = []
        self._step_hooks: list[RemovableHandle] = []
        self._unwritten: _Unwritten | None = None
        self._captured = _Captured()
        self._opened = self._resumed = self._setup_checked = False
        self._profiled_map: object = None  # the layer map the diagnosis' profile was built from

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
            Every rank, after ``model, optimizer = fabric.setup(model, optimizer)`` (a whole loop:
            :mod:`gradlight.fabric`):

            >>> recorder = GradientFlowRecorder.for_fabric(fabric, model, "runs/fabric")  # doctest: +SKIP
        """
        from gradlight.fabric import fabric_arguments

        module, fixed, defaults = fabric_arguments(fabric, model, sharding)
        return cls(module, save_dir, **fixed, **{**defaults, **kwargs})

    # --------------------------------------------------------------------------------- public read access
    @property
    def save_dir(self) -> Path | None:
        """The run folder, or ``None`` when recording in memory only."""
        return None if self.folder is None else self.folder.root

    @property
    def records_written(self) -> int:
        """Records this recorder (or the run it resumes) appended to the history."""
        return self.writer.records_written

    @records_written.setter
    def records_written(self, value: int) -> None:
        self.writer.records_written = value

    @property
    def should_stop(self) -> bool:
        """Set when a finding's action is ``"stop"``: a loop that honours it ends the run."""
        return self.anomaly.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.anomaly.should_stop = value

    @property
    def taps(self) -> ActivationTaps | None:
        """The activation taps (``track_activations``), built at the first logged step."""
        return self.step_taps.activations

    @property
    def signal_taps(self) -> BackwardSignalTaps | None:
        """The backward-signal taps (``track_backward_signal``), built at the first logged step."""
        return self.step_taps.signal

    @property
    def last_recorded_step(self) -> int:
        """The last optimizer step recorded (``-1`` before the first); steps up to it are never recorded again."""
        return self.steps.last_recorded_step

    @last_recorded_step.setter
    def last_recorded_step(self, value: int) -> None:
        self.steps.last_recorded_step = value

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
        return self.steps.is_logged(step)

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
        try:
            self.writer.open(self._resumed, self.last_recorded_step)
        except HistoryExistsError:
            self._opened = False
            raise

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
        step = self.steps.continued(step)
        self.step_taps.begin(step)
        if self.tracker.forward_order is None and not self.tracker.discovering:
            self.tracker.start_discovery()
        if self.is_logged_step(step):
            self.step_taps.start(step)

    def pause_activations(self) -> None:
        """Stop the activation and forward-origin taps until the next :meth:`start_step` (e.g. for validation)."""
        self.step_taps.pause()

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
        check_step(step)
        check_positive_number("grad_scale", grad_scale, allow_none=True)
        check_positive_number("backward_scale", backward_scale, allow_none=True)
        self.open()
        step = self.steps.continued(step)
        forward = self._end_passes()
        if self.tracker.pending:
            if self.tracker.pending_step == step:
                return True  # already captured for this step (e.g. by the mixin under manual optimization)
            self.after_step()
        owner = unwrap_optimizer(optimizer) if hasattr(optimizer, "param_groups") else None
        self.optimizers.read_probe(owner)  # the first step after the optimizer's last record tells
        if not self.optimizers.is_logged(self.steps, step, owner):
            return False
        _, params = optimizer_and_params(optimizer)
        grad_scale, self.step_taps.backward_scale = step_scales(self.grad_scaler, owner, grad_scale, backward_scale)
        self.tracker.capture(step, params, grad_scale=grad_scale, owner=owner)
        self._profile()
        self._captured = _Captured(
            self.optimizers.stream_of(owner, self.tracker.layer_map),
            forward,
            self.optimizers.carried(owner, params, probe=self.diagnosis is not None),
            owner is not None and any(bool(g.get("maximize")) for g in owner.param_groups),
            adaptive_decay(owner, self.tracker.layer_map) if self.diagnosis is not None else None,
        )
        return True

    def _end_passes(self) -> ForwardSeen | None:
        """The step's forward and backward passes are over: stop the discovery and the taps; what ran in forward."""
        tracker = self.tracker
        forward = self.step_taps.forward_seen()
        if tracker.discovering:
            tracker.stop_discovery()
            forward = ForwardSeen(frozenset(tracker.forward_order or []))  # the discovery watched every module
        self.step_taps.stop()
        return forward

    def _profile(self) -> None:
        """Give the diagnosis the model's profile, built at the first captured step (lazy modules need a forward).

        Built again when a parameter frozen until now joined the layer map (another optimizer's network).
        """
        if self.diagnosis is None or self._profiled_map is self.tracker.layer_map:
            return
        config, tracker = self.diagnosis_config, self.tracker
        self.diagnosis.profile = ModelProfile.from_tracker(
            tracker, config.init_scale_tolerance, gain_threshold=config.gain_threshold
        )
        order = tracker.forward_order
        self.diagnosis.modules_run = set(order) if order is not None else None
        self.diagnosis.world_size = self.collectives.world_size
        self._profiled_map = tracker.layer_map

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
        captured, self._captured = self._captured, _Captured()
        if captured.maximize:
            record.global_metrics["optimizer_maximize"] = 1.0
        self.last_recorded_step = record.step
        tapped = self.step_taps.finalize(record.step, self.tracker.layer_map, self.collectives)
        if not self.run_info.activation_sites:
            self.run_info.activation_sites = list(self.step_taps.activation_sites)
        self._unwritten = _Unwritten(record, *tapped, captured)
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
        value = mean_over_ranks(self.collectives, loss_value(loss), device_of(self.model))
        if value is not None:
            record.global_metrics["loss"] = value
        return self._emit()

    def _emit(self, final: bool = False) -> list[Finding]:
        unwritten, self._unwritten = self._unwritten, None
        if unwritten is None:
            return []
        record = unwritten.record
        findings = self._diagnose(unwritten)
        if self.collectives.is_global_zero:
            self._write(record, unwritten.activations, unwritten.signal)
            for listener in self._listeners:
                listener(record)
        if self.diagnosis is not None:
            self._act_on(findings, record.step, final)
        return findings

    def _diagnose(self, unwritten: _Unwritten) -> list[Finding]:
        """Run the diagnosis on every rank with identical inputs; rank zero appends the findings."""
        if self.diagnosis is None:
            return []
        # Records are identical on every rank; the loss is each rank's own, and only the dormant rule reads
        # it. No collective for it: rank zero writes the findings, and raise / stop decisions are agreed.
        record, captured = unwritten.record, unwritten.captured or _Captured()
        findings = self.diagnosis.update(
            record,
            unwritten.activations,
            record.global_metrics.get("loss"),
            loss_scaled=self.loss_scaled,
            signal=unwritten.signal,
            nonfinite_modules=unwritten.nonfinite_modules,
            stream=captured.stream,
            forward=captured.forward,
            grads_carried=captured.carried,
            adaptive=captured.adaptive,
        )
        self.step_taps.watch_missing(record, captured.stream)
        self.writer.write_findings(findings)
        return findings

    def _write(self, record: StepRecord, acts: ActivationStats | None, signal: SignalStats | None) -> None:
        """Append the step to the history; ``run.json`` is rewritten first when it is out of date."""
        updates = self.tracker.updates
        self.writer.write(
            record,
            acts,
            signal,
            run_info=self.run_info,
            update_methods=self._update_methods(),
            kernel=updates.kernel_info if updates is not None else None,
            layers=self._layer_infos,
            layer_count=len(self.tracker.layer_map.layers),  # grows when another optimizer's network joins
        )

    def _layer_infos(self) -> list[LayerInfo]:
        """The layers of ``run.json``: name, depth and size."""
        layer_map = self.tracker.layer_map
        return [
            LayerInfo(name, depth, size)
            for depth, (name, size) in enumerate(zip(layer_map.layers, layer_map.layer_sizes()))
        ]

    def _update_methods(self) -> dict[str, str]:
        """How ``update_ratio`` got each param group's update so far (``{"0": "optimizer: AdamW (foreach)"}``)."""
        updates = self.tracker.updates
        return {} if updates is None else {group: how.describe() for group, how in updates.methods.items()}

    def _act_on(self, findings: list[Finding], step: int, final: bool) -> None:
        """Warn, stop or raise for new warning findings; raise/stop decisions are agreed across ranks."""
        decision = self.anomaly.decide(findings, final)
        if not final:  # the run is ending (or an exception is under way): no collectives, nothing to stop
            decision = self.anomaly.agree(decision, device_of(self.model))
        self.anomaly.act(decision, step, self.flush)

    # ------------------------------------------------------------------------------ activation statistics
    # --------------------------------------------------------------------------------------------- closing
    def flush(self) -> None:
        """Write buffered records to disk now (rank zero; a no-op elsewhere)."""
        self.writer.flush()

    def close(self) -> None:
        """Emit a record still waiting for its loss, close the history, remove every hook. Idempotent.

        A step captured but never finished is dropped. The recorder can record again after :meth:`open`.
        """
        self.tracker.stop_discovery()
        self.tracker.discard()
        self.step_taps.discard()
        self._emit(final=True)
        self.writer.close()
        self._opened = False
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        self.optimizers.close()

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
            **self.steps.state_dict(),
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
        check_step(step)
        self.steps.resume_at(step)  # going back to `step` is a resume, not a restart
        self._resumed = self._resumed or step > 0

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
        self.steps.load_state_dict(state_dict)
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


def _tracker(model: nn.Module, options: RecorderOptions, reduction: CrossRankReduction | None) -> GradientFlowTracker:
    return GradientFlowTracker(
        model,
        group_by=options.group_by,
        exclude=options.exclude,
        track_update_ratio=options.track_update_ratio,
        update_method=options.update_method,
        update_kernel=options.update_kernel,
        edge_layers=options.edge_layers,
        reduction=reduction,
    )


def _recorded_run_info(
    template: RunInfo | None,
    options: RecorderOptions,
    clip: float | None,
    clip_algorithm: str | None,
    collectives: Collectives,
    model: nn.Module,
) -> RunInfo:
    """``run.json`` of a recorder: the caller's template with what the recorder knows filled in."""
    if template is None:
        template = RunInfo(gradlight_version=__version__, trainer="pytorch", log_every_n_steps=0)
    return replace(
        template,
        gradlight_version=__version__,
        log_every_n_steps=options.log_every_n_steps,
        gradient_clip_val=clip,
        gradient_clip_algorithm=clip_algorithm if clip else None,
        # a template's larger world: a trainer whose other ranks do not record (Ultralytics' DDP)
        world_size=max(template.world_size, collectives.world_size),
        model=template.model or type(model).__qualname__,
        layers=[],
        activation_sites=[],
    )
