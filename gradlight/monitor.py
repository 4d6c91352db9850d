"""The Lightning callback: *when* gradients are read, and *where* the results go.

The statistics themselves come from :class:`gradlight.tracker.GradientFlowTracker` (Trainer-free); this file
only schedules it from Lightning's hooks, sends a small summary to the Trainer's loggers, and appends every
record to the durable history on disk.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from gradlight import __version__
from gradlight.activations import ActivationStats, ActivationTaps
from gradlight.diagnosis import (
    DiagnosisConfig,
    Finding,
    FindingsWriter,
    GradientAnomalyError,
    GradientDiagnosis,
    ModelProfile,
    resolve_actions,
)
from gradlight.history import GLOBAL_LAYER, HistoryWriter, list_segments, write_json_atomic
from gradlight.layers import GroupBy, validate_group_by
from gradlight.mixin import GradientFlowSpec, find_spec
from gradlight.sharding import SHARDING_MODES, resolve_reduction
from gradlight.stats import CrossRankReduction
from gradlight.tracker import GradientFlowTracker, StepRecord

__all__ = ["GradientFlowMonitor"]

LOG_PREFIX = "gradflow"


class GradientFlowMonitor(Callback):
    r"""Records per-layer gradient statistics of every logged optimizer step, exactly and almost for free.

    Gradients are read in ``on_before_optimizer_step``: accumulated over ``accumulate_grad_batches``,
    unscaled by AMP, before clipping. On steps that are not logged the monitor does no tensor work at all;
    on logged steps it computes fused per-tensor norms, reduces them per layer on the device and copies
    everything to the host once. Per-layer values go to a durable history on disk (read it back with
    :func:`gradlight.load_history`); a small summary goes to every logger of the Trainer under
    ``gradflow/``.

    Args:
        log_every_n_steps: Record every this many optimizer steps. ``None`` uses the Trainer's
            ``log_every_n_steps``.
        save_dir: Folder of the history. ``None`` uses ``<trainer.log_dir>/gradlight``.
        group_by: ``None`` (one layer per module that owns parameters), an int (aggregate to that many
            leading name components, e.g. ``2`` -> ``model.3``) or a callable ``param_name -> layer_name``.
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        log_per_layer: Also send per-layer ``grad_l2`` to the loggers (``gradflow/grad_l2/<layer>``). Off by
            default: loggers, not arithmetic, are what makes per-layer logging expensive.
        track_update_ratio: Record ``update_ratio`` (needs a copy of the parameters on logged steps).
        edge_layers: Number of first and last layers the early-to-late ratio compares.
        flush_every_n_records: Write the history to disk every this many records (also at checkpoints, at the
            end of fit and on exceptions). Bounds memory however long the run.
        overwrite: Replace a history that already is in ``save_dir`` instead of refusing to start.
        sharding: How statistics combine across ranks: ``"auto"`` detects it from the Trainer's strategy;
            see :mod:`gradlight.sharding` for the modes, or pass a ``CrossRankReduction`` for custom ones.
        diagnose: Diagnose vanishing, exploding, non-finite, dormant, saturated and dead layers on logged
            steps (see :mod:`gradlight.diagnosis`); findings go to ``save_dir/findings.jsonl`` (read them with
            :func:`gradlight.load_findings`) and their count to the loggers as ``gradflow/findings``.
        diagnosis: Thresholds of the diagnosis (:class:`gradlight.DiagnosisConfig`).
        on_anomaly: What to do about a new finding: ``"warn"`` (once per kind and layer, rank zero),
            ``"raise"`` (:class:`gradlight.GradientAnomalyError`), ``"stop"`` (``trainer.should_stop``) or
            ``"ignore"`` (only recorded); or a mapping per kind, e.g. ``{"non_finite": "raise",
            "default": "warn"}``. The history is flushed before raising or stopping; under DDP all ranks
            take the same decision.
        track_activations: Tap activation modules on logged steps (forward hooks, removed after the step's
            micro-batches) and record ``act_saturation``, ``act_dead``, ``act_mean`` and ``act_std`` per
            site (see :mod:`gradlight.activations`); needed for ``saturated``/``dead_units`` findings.
        log_figures_every_n_epochs: Send the heat map and the gradient-flow profile as figures to every
            logger that takes images (TensorBoard, W&B, MLflow, Comet; see :mod:`gradlight.report.loggers`)
            at the end of every this many training epochs and at the end of fit; ``None`` never. Rank zero
            reads the history back from disk for it, so it costs nothing on training steps; without an
            image-taking logger nothing is drawn.
        log_histograms: Also send one gradient histogram per layer to TensorBoard on logged steps. Costs a
            copy of every gradient to the host on those steps; under sharded strategies rank zero's shard.

    Example:
        >>> import lightning as L
        >>> from gradlight import GradientFlowMonitor, load_history
        >>> monitor = GradientFlowMonitor(log_every_n_steps=10, save_dir="runs/exp1/gradlight")
        >>> trainer = L.Trainer(callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> history = load_history("runs/exp1/gradlight")  # doctest: +SKIP
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        save_dir: str | Path | None = None,
        *,
        group_by: GroupBy = None,
        exclude: Sequence[str] = (),
        log_per_layer: bool = False,
        track_update_ratio: bool = True,
        edge_layers: int = 1,
        flush_every_n_records: int = 20,
        overwrite: bool = False,
        sharding: str | CrossRankReduction = "auto",
        diagnose: bool = True,
        diagnosis: DiagnosisConfig | None = None,
        on_anomaly: str | Mapping[str, str] = "warn",
        track_activations: bool = False,
        log_figures_every_n_epochs: int | None = 1,
        log_histograms: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        _check_positive_int("edge_layers", edge_layers)
        _check_positive_int("flush_every_n_records", flush_every_n_records)
        _check_positive_int("log_figures_every_n_epochs", log_figures_every_n_epochs, allow_none=True)
        validate_group_by(group_by)
        if isinstance(exclude, str):
            raise ValueError(f"`exclude` must be a sequence of patterns, not a single string: got {exclude!r}.")
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(pattern, str) for pattern in exclude):
            raise ValueError(f"`exclude` must be a list or tuple of fnmatch pattern strings, got {exclude!r}.")
        for flag, flag_value in (
            ("log_per_layer", log_per_layer),
            ("track_update_ratio", track_update_ratio),
            ("overwrite", overwrite),
            ("diagnose", diagnose),
            ("track_activations", track_activations),
            ("log_histograms", log_histograms),
        ):
            if not isinstance(flag_value, bool):
                raise ValueError(f"`{flag}` must be True or False, got {flag_value!r}.")
        if save_dir is not None and not isinstance(save_dir, (str, Path)):
            raise ValueError(f"`save_dir` must be a path (str or Path) or None, got {save_dir!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.save_dir: Path | None = Path(save_dir) if save_dir is not None else None
        self.group_by = group_by
        self.exclude = tuple(exclude)
        self.log_per_layer = log_per_layer
        self.track_update_ratio = track_update_ratio
        self.edge_layers = edge_layers
        self.flush_every_n_records = flush_every_n_records
        self.overwrite = overwrite
        if (isinstance(sharding, str) and sharding not in SHARDING_MODES) or not (
            isinstance(sharding, str) or callable(sharding)
        ):
            raise ValueError(f"`sharding` must be one of {SHARDING_MODES} or a CrossRankReduction, got {sharding!r}.")
        self.sharding = sharding
        self.log_figures_every_n_epochs = log_figures_every_n_epochs
        self.log_histograms = log_histograms

        self.tracker: GradientFlowTracker | None = None
        self.last_recorded_step = -1
        self.records_written = 0
        self._interval = log_every_n_steps or 50
        self._writer: HistoryWriter | None = None
        self._restored_order: list[str] | None = None
        self._resumed = False
        self._step_hooks: list[RemovableHandle] = []
        self._unwritten: StepRecord | None = None
        self._records_since_flush = 0
        self._run_info: dict[str, Any] = {}
        self._trainer: pl.Trainer | None = None
        self._figures_step: int | None = None

        # diagnosis and activation taps (gradlight.diagnosis, gradlight.activations)
        if diagnosis is not None and not isinstance(diagnosis, DiagnosisConfig):
            raise ValueError(f"`diagnosis` must be a DiagnosisConfig or None, got {diagnosis!r}.")
        self.diagnose = diagnose
        self.diagnosis_config = diagnosis if diagnosis is not None else DiagnosisConfig()
        self.on_anomaly = on_anomaly
        self._actions = resolve_actions(on_anomaly)
        self.track_activations = track_activations
        self.diagnosis: GradientDiagnosis | None = GradientDiagnosis(self.diagnosis_config) if diagnose else None
        self.taps: ActivationTaps | None = None
        self._taps_step: int | None = None
        self._unwritten_acts: ActivationStats | None = None
        self._findings_writer: FindingsWriter | None = None
        self._module_layers: dict[str, tuple[str, int]] | None = None
        self._profiled = False

    # --------------------------------------------------------------------------------- public read access
    @property
    def latest(self) -> StepRecord | None:
        """The most recent record (on every rank), or ``None`` before the first logged step."""
        return None if self.tracker is None else self.tracker.latest

    @property
    def findings(self) -> list[Finding]:
        """Diagnosis findings reported so far in this process (every rank), oldest first."""
        return [] if self.diagnosis is None else list(self.diagnosis.findings)

    @property
    def interval(self) -> int:
        """The logging interval in optimizer steps, resolved against the Trainer in ``setup``."""
        return self._interval

    def is_logged_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is recorded."""
        return step % self._interval == 0

    # --------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._interval = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if self.save_dir is None:
            root = trainer.log_dir or trainer.default_root_dir
            self.save_dir = Path(root) / "gradlight"
        if self.save_dir.exists() and not self.save_dir.is_dir():
            raise MisconfigurationException(
                f"GradientFlowMonitor(save_dir={str(self.save_dir)!r}) is a file; pass a folder path."
            )
        spec = find_spec(pl_module)
        self.tracker = self._build_tracker(pl_module, spec)
        self.tracker.reduction = resolve_reduction(trainer.strategy, self.sharding)
        if self._restored_order is not None:
            self.tracker.set_forward_order(self._restored_order)
        self._run_info = {
            "gradlight_version": __version__,
            "log_every_n_steps": self._interval,
            "gradient_clip_val": trainer.gradient_clip_val,
            "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "model": type(pl_module).__qualname__,
        }

    def _build_tracker(self, pl_module: pl.LightningModule, spec: GradientFlowSpec | None) -> GradientFlowTracker:
        group_by = self.group_by
        exclude = self.exclude
        if spec is not None:
            group_by = spec.group_by if spec.group_by is not None else group_by
            exclude = exclude + tuple(spec.exclude)
        return GradientFlowTracker(
            pl_module,
            group_by=group_by,
            exclude=exclude,
            track_update_ratio=self.track_update_ratio,
            edge_layers=self.edge_layers,
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_existing_history(trainer)
        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if trainer.is_global_zero and self.save_dir is not None:
            # A resumed run recomputes every step after the checkpoint's last record: those rows supersede.
            self._writer = HistoryWriter(self.save_dir, start_step=self.last_recorded_step + 1)
        self._setup_diagnosis(trainer, pl_module)  # after configure_model and the strategy's wrapping

    def _check_existing_history(self, trainer: pl.Trainer) -> None:
        assert self.save_dir is not None  # set in setup
        found = bool(list_segments(self.save_dir / "history")) if trainer.is_global_zero else False
        found = bool(trainer.strategy.broadcast(found, src=0))
        if not found or self._resumed or self._writer is not None or self.records_written:
            return
        if not self.overwrite:
            raise MisconfigurationException(
                f"GradientFlowMonitor: {str(self.save_dir)!r} already holds a gradlight history from another "
                "run. Pass a new `save_dir`, resume that run with `trainer.fit(..., ckpt_path=...)`, or set "
                "`GradientFlowMonitor(overwrite=True)` to replace it."
            )
        if trainer.is_global_zero:
            shutil.rmtree(self.save_dir / "history", ignore_errors=True)
            (self.save_dir / "findings.jsonl").unlink(missing_ok=True)
        trainer.strategy.barrier("gradlight_overwrite")

    # ------------------------------------------------------------------------------------ training hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        tracker = self.tracker
        if tracker is not None and tracker.forward_order is None:
            tracker.start_discovery()
        step = trainer.global_step  # the optimizer step this micro-batch feeds
        if self.taps is not None and self.is_logged_step(step) and step > self.last_recorded_step:
            self.taps.start()  # idempotent over the micro-batches of one accumulated step
            self._taps_step = step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.capture(trainer, optimizer)

    def capture(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """Read ``optimizer``'s gradients now if this optimizer step is logged (used by the mixin too)."""
        tracker = self.tracker
        if tracker is None:
            return
        if tracker.discovering:
            tracker.stop_discovery()
        if self.taps is not None:
            self.taps.stop()  # forward passes of this step are over
        step = trainer.global_step
        if tracker.pending:
            if tracker.pending_step == step:
                return  # already captured for this step (e.g. by the mixin under manual optimization)
            self._finish(trainer)
        if not self.is_logged_step(step) or step <= self.last_recorded_step:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.diagnosis is not None and not self._profiled:
            config = self.diagnosis_config
            self.diagnosis.profile = ModelProfile.from_tracker(
                tracker, config.init_scale_tolerance, gain_threshold=config.gain_threshold
            )
            self.diagnosis.modules_run = set(tracker.forward_order) if tracker.forward_order is not None else None
            self._profiled = True
        tracker.capture(step, params, grad_scale=_amp_scale_left_in_grads(trainer, optimizer), owner=optimizer)
        self._trainer = trainer
        if self.log_histograms and trainer.is_global_zero and trainer.loggers:
            from gradlight.report.loggers import log_gradient_histograms

            log_gradient_histograms(trainer.loggers, tracker.pending_gradients(), step)

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        tracker = self.tracker
        if tracker is not None and tracker.pending and tracker.pending_owner() is optimizer:
            assert self._trainer is not None  # set by capture()
            self._finish(self._trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        if tracker.pending:  # the optimizer step was skipped (AMP found inf/NaN): parameters did not move
            self._finish(trainer)
        if self._unwritten is not None:
            loss = _loss_of(outputs)
            if loss is not None:
                self._unwritten.global_metrics["loss"] = loss
            self._emit(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        """Finalize the captured step; it is emitted once the batch's loss is known (or at the end)."""
        assert self.tracker is not None
        self._emit(trainer)  # a record still waiting for its loss goes out without it
        record = self.tracker.finalize()
        self.last_recorded_step = record.step
        self._unwritten = record
        self._unwritten_acts = self._finalize_taps(trainer, record.step)

    def _emit(self, trainer: pl.Trainer, final: bool = False) -> None:
        record, self._unwritten = self._unwritten, None
        acts, self._unwritten_acts = self._unwritten_acts, None
        findings = self._diagnose(trainer, record, acts, final) if record is not None else []
        if record is not None and trainer.is_global_zero:
            self._write(record)
            self._write_activations(acts)
            self._log_summary(trainer, record)
        if record is not None and self.diagnosis is not None:
            self._act_on(trainer, findings, final)

    # ------------------------------------------------------------------------------- where results go
    def _write(self, record: StepRecord) -> None:
        if self._writer is None:
            return
        if self.records_written == 0:
            self._write_run_info()
        self._writer.append_step(record.step, record.layers, record.depths, record.metrics)
        self._writer.append_global(record.step, record.global_metrics)
        self.records_written += 1
        self._records_since_flush += 1
        if self._records_since_flush >= self.flush_every_n_records:
            self.flush()

    def _write_run_info(self) -> None:
        assert self.save_dir is not None and self.tracker is not None
        layer_map = self.tracker.layer_map
        self._run_info["layers"] = [
            {"name": name, "depth": depth, "num_params": size}
            for depth, (name, size) in enumerate(zip(layer_map.layers, layer_map.layer_sizes()))
        ]
        self._run_info["global_layer"] = GLOBAL_LAYER
        self.save_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.save_dir / "run.json", self._run_info)

    def _log_summary(self, trainer: pl.Trainer, record: StepRecord) -> None:
        if not trainer.loggers:
            return
        metrics = {f"{LOG_PREFIX}/{name}": value for name, value in record.global_metrics.items()}
        if self.log_per_layer:
            for layer, value in zip(record.layers, record.metrics["grad_l2"]):
                metrics[f"{LOG_PREFIX}/grad_l2/{layer}"] = float(value)
        if self.diagnosis is not None:
            metrics[f"{LOG_PREFIX}/findings"] = float(self.diagnosis.findings_count)
            metrics[f"{LOG_PREFIX}/notes"] = float(self.diagnosis.notes_count)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.step)

    def flush(self) -> None:
        """Write buffered records to disk now (rank zero; a no-op elsewhere)."""
        if self._writer is not None:
            self._writer.flush()
        self._records_since_flush = 0

    def _close(self) -> None:
        if self._unwritten is not None and self._trainer is not None:
            self._emit(self._trainer, final=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.log_figures_every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._log_figures(trainer)

    def _log_figures(self, trainer: pl.Trainer) -> None:
        """Heat map and profile to the loggers that take images (rank zero, from the flushed history)."""
        from gradlight.report.loggers import log_figures, logger_kind  # matplotlib only when figures are sent

        if not (trainer.is_global_zero and self.records_written and self.save_dir is not None):
            return
        if self._figures_step == trainer.global_step:
            return  # already sent at this step (the last epoch's end is also the end of fit)
        if not any(logger_kind(logger) != "none" for logger in trainer.loggers):
            return
        self.flush()
        log_figures(trainer.loggers, self.save_dir, trainer.global_step, findings=self.findings, prefix=LOG_PREFIX)
        self._figures_step = trainer.global_step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.taps is not None:
            self.taps.stop()  # validation between accumulated micro-batches is not training; resumes next batch

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.flush()  # everything up to the checkpoint is on disk before the checkpoint is

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self.log_figures_every_n_epochs is not None:
            self._log_figures(trainer)  # the whole run, whatever the epoch count

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tracker is not None:
            self.tracker.stop_discovery()
            self.tracker.discard()
        if self.taps is not None:
            self.taps.discard()
        self._close()

    # ------------------------------------------------------------------------- diagnosis and activations
    def _setup_diagnosis(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.diagnosis_config
        if self.diagnosis is not None:
            self._profiled = False  # profiled at the first capture: lazy modules are initialised by then
            self.diagnosis.world_size = trainer.world_size
            clip = trainer.gradient_clip_val
            algorithm = trainer.gradient_clip_algorithm
            self.diagnosis.gradient_clip_val = float(clip) if clip else None
            self.diagnosis.gradient_clip_algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
            if trainer.is_global_zero and self.save_dir is not None:
                self._findings_writer = FindingsWriter(self.save_dir)
        if self.track_activations and self.taps is None:
            self.taps = ActivationTaps(pl_module, saturation_derivative=config.saturation_derivative)
        self._module_layers = None

    def _layers_of_modules(self) -> dict[str, tuple[str, int]]:
        """``module name -> (layer, depth)`` for the modules whose parameters are monitored."""
        if self._module_layers is None:
            assert self.tracker is not None
            layer_map = self.tracker.layer_map
            mapping: dict[str, tuple[str, int]] = {}
            for name, index in zip(layer_map.param_names, layer_map.param_layer):
                mapping.setdefault(name.rpartition(".")[0], (layer_map.layers[index], index))
            self._module_layers = mapping
        return self._module_layers

    def _finalize_taps(self, trainer: pl.Trainer, step: int) -> ActivationStats | None:
        """Activation statistics of ``step``: one all_reduce (every rank calls it) and one host copy."""
        taps = self.taps
        if taps is None or self._taps_step != step:
            return None
        taps.stop()
        self._taps_step = None
        if not taps.sites:
            return None
        strategy = trainer.strategy

        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(tensor, reduce_op="sum")

        assert self.tracker is not None
        stats = taps.finalize(
            step,
            reduce if trainer.world_size > 1 else None,
            self._layers_of_modules(),
            default_depth=len(self.tracker.layer_map.layers),
        )
        if stats is not None and "activation_sites" not in self._run_info:
            self._run_info["activation_sites"] = [
                {"name": site, "kind": kind, "feeds": fed, "depth": int(depth)}
                for site, kind, fed, depth in zip(stats.sites, stats.kinds, stats.feeds, stats.depths)
            ]
        return stats

    def _write_activations(self, stats: ActivationStats | None) -> None:
        if self._writer is not None and stats is not None:
            self._writer.append_step(stats.step, stats.sites, stats.depths, stats.metrics)

    def _diagnose(
        self, trainer: pl.Trainer, record: StepRecord, acts: ActivationStats | None, final: bool
    ) -> list[Finding]:
        """Run the diagnosis on every rank with identical inputs; rank zero appends the findings."""
        if self.diagnosis is None:
            return []
        # Records are identical on every rank; the loss is each rank's own, and only the dormant rule reads
        # it (does the loss still move?). No collective for it: rank zero writes the findings, and raise /
        # stop decisions are agreed across ranks in `_act_on`.
        loss = record.global_metrics.get("loss")
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16 AMP: overflow is routine
        findings = self.diagnosis.update(record, acts, loss, loss_scaled=scaled)
        if findings and self._findings_writer is not None:
            self._findings_writer.append(findings)
        return findings

    def _act_on(self, trainer: pl.Trainer, findings: list[Finding], final: bool) -> None:
        """Warn, stop or raise for new findings; raise/stop decisions are agreed across ranks."""
        findings = [finding for finding in findings if finding.is_warning]  # notes are only recorded
        for finding in findings:
            action = self._actions[finding.kind]
            if action in ("warn", "stop"):
                rank_zero_warn(
                    f"gradlight: {finding.message}. Likely cause: {finding.cause}. Remedy: {finding.remedy}."
                )
        if final:
            return  # end of fit or an exception is already under way: no collectives, nothing to stop
        to_raise = [f for f in findings if self._actions[f.kind] == "raise"]
        to_stop = [f for f in findings if self._actions[f.kind] == "stop"]
        do_raise, do_stop = bool(to_raise), bool(to_stop)
        if trainer.world_size > 1 and any(a in ("raise", "stop") for a in self._actions.values()):
            # Like EarlyStopping's reduce_boolean_decision: any rank's decision is every rank's (one op).
            flags = torch.tensor(
                [float(do_raise), float(do_stop)], dtype=torch.float32, device=trainer.strategy.root_device
            )
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            do_raise, do_stop = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if not (do_raise or do_stop):
            return
        self.flush()  # the history up to this step is on disk before the run stops
        if do_raise:
            raise GradientAnomalyError(to_raise or findings)
        trainer.should_stop = True
        rank_zero_warn(
            f"gradlight: stopping the run at step {trainer.global_step} "
            f"({', '.join(sorted({f.kind for f in to_stop})) or 'a finding on another rank'})."
        )

    # ------------------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        order = self.tracker.forward_order if self.tracker is not None else self._restored_order
        return {
            "version": 1,
            "last_recorded_step": self.last_recorded_step,
            "records_written": self.records_written,
            "forward_order": list(order) if order is not None else None,
            "diagnosis": self.diagnosis.state_dict() if self.diagnosis is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_recorded_step = int(state_dict.get("last_recorded_step", -1))
        self.records_written = int(state_dict.get("records_written", 0))
        order = state_dict.get("forward_order")
        self._restored_order = list(order) if order is not None else None
        if self.tracker is not None and self._restored_order is not None:
            self.tracker.set_forward_order(self._restored_order)
        if self.diagnosis is not None and state_dict.get("diagnosis"):
            self.diagnosis.load_state_dict(state_dict["diagnosis"])
        self._resumed = True


def _check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        valid = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")


def _amp_scale_left_in_grads(trainer: pl.Trainer, optimizer: Optimizer) -> float:
    """The loss scale still in the gradients at ``on_before_optimizer_step`` (1.0 unless fused + fp16 AMP).

    Lightning unscales before the hook, except for optimizers that unscale inside ``step()`` (fused ones).
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    return float(scaler.get_scale())


def _loss_of(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach())
    return None
