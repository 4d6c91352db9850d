"""The Lightning callback: a thin layer of Trainer hooks over :class:`gradlight.GradientFlowRecorder`.

The recorder owns everything a recorded run needs (statistics, diagnosis, history, findings, run info and
checkpoint state); this file only says *when* Lightning's hooks drive it and sends the summary and the
figures to the Trainer's loggers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from gradlight.amp import backward_scale_of
from gradlight.diagnosis import DiagnosisConfig
from gradlight.layers import GroupBy
from gradlight.options import RecorderOptions
from gradlight.recorder import LOG_PREFIX, Collectives, GradientFlowRecorder, HistoryExistsError
from gradlight.runfolder import RunInfo
from gradlight.sharding import SHARDING_MODES, resolve_reduction
from gradlight.spec import find_spec
from gradlight.stats import CrossRankReduction
from gradlight.tracker import StepRecord
from gradlight.validation import check_bool, check_path, check_positive_int

__all__ = ["LOG_PREFIX", "GradientFlowMonitor"]


class GradientFlowMonitor(Callback):
    r"""Records per-layer gradient statistics of every logged optimizer step, exactly and almost for free.

    Gradients are read in ``on_before_optimizer_step``: accumulated over ``accumulate_grad_batches``,
    unscaled by AMP, before clipping. On steps that are not logged the monitor does no tensor work at all;
    on logged steps it computes fused per-tensor norms, reduces them per layer on the device and copies
    everything to the host once. Per-layer values go to a durable history on disk (read it back with
    :func:`gradlight.load_history`); a small summary goes to every logger of the Trainer under
    ``gradflow/``. The work is done by a :class:`gradlight.GradientFlowRecorder` (:attr:`recorder`), the
    Trainer-free object that plain PyTorch and Fabric loops use directly.

    Several monitors can watch one Trainer (e.g. different intervals or groupings, each with its own
    ``save_dir``): each checkpoints its own state under its :attr:`state_key`.

    Args:
        log_every_n_steps: Record every this many optimizer steps. ``None`` uses the Trainer's
            ``log_every_n_steps``.
        save_dir: Folder of the history. ``None`` uses ``<trainer.log_dir>/gradlight``.
        log_per_layer: Also send per-layer ``grad_l2`` to the loggers (``gradflow/grad_l2/<layer>``). Off by
            default: loggers, not arithmetic, are what makes per-layer logging expensive.
        sharding: How statistics combine across ranks: ``"auto"`` detects it from the Trainer's strategy;
            see :mod:`gradlight.sharding` for the modes, or pass a ``CrossRankReduction`` for custom ones.
        log_figures_every_n_epochs: Send the heat map and the gradient-flow profile as figures to every
            logger that takes images (TensorBoard, W&B, MLflow, Comet; see :mod:`gradlight.report.loggers`)
            at the end of every this many training epochs and at the end of fit; ``None`` never. Rank zero
            reads the history back from disk for it, so it costs nothing on training steps; without an
            image-taking logger nothing is drawn.
        log_histograms: Also send one gradient histogram per layer to TensorBoard on logged steps. Costs a
            copy of every gradient to the host on those steps; under sharded strategies rank zero's shard.
        group_by: A recording option (:class:`gradlight.RecorderOptions`, where each is documented). A
            module's ``configure_gradient_flow()`` (:class:`gradlight.GradientFlowSpec`) may override it.
        exclude: A recording option; a module's ``configure_gradient_flow()`` may add patterns.
        track_update_ratio: A recording option.
        edge_layers: A recording option.
        flush_every_n_records: A recording option (the monitor also flushes at checkpoints).
        overwrite: A recording option.
        diagnose: A recording option; the findings' counts go to the loggers as ``gradflow/findings``
            (warnings) and ``gradflow/notes`` (notes).
        diagnosis: A recording option.
        on_anomaly: A recording option; ``"stop"`` sets ``trainer.should_stop``.
        track_activations: A recording option.
        track_backward_signal: A recording option.
        update_method: A recording option.
        update_kernel: A recording option.

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
        track_backward_signal: bool = False,
        update_method: str = "auto",
        update_kernel: str = "auto",
        log_figures_every_n_epochs: int | None = 1,
        log_histograms: bool = False,
    ) -> None:
        super().__init__()
        self._logger_warnings: set[tuple[str, str]] = set()  # loggers that failed: each warned about once
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_positive_int("log_figures_every_n_epochs", log_figures_every_n_epochs, allow_none=True)
        check_bool("log_per_layer", log_per_layer)
        check_bool("log_histograms", log_histograms)
        check_path("save_dir", save_dir)
        if (isinstance(sharding, str) and sharding not in SHARDING_MODES) or not (
            isinstance(sharding, str) or callable(sharding)
        ):
            raise ValueError(f"`sharding` must be one of {SHARDING_MODES} or a CrossRankReduction, got {sharding!r}.")
        # The recording options among the arguments, validated now rather than at fit time.
        self.options = RecorderOptions.from_arguments(locals(), log_every_n_steps=log_every_n_steps or 50)
        self.log_every_n_steps = log_every_n_steps
        self._save_dir_arg = Path(save_dir) if save_dir is not None else None
        self.save_dir: Path | None = self._save_dir_arg
        self.sharding = sharding
        self.log_per_layer = log_per_layer
        self.log_figures_every_n_epochs = log_figures_every_n_epochs
        self.log_histograms = log_histograms
        #: The recorder of the current (or last) fit; ``None`` before ``setup``.
        self.recorder: GradientFlowRecorder | None = None
        self._state: dict[str, Any] = {"last_recorded_step": -1, "records_written": 0}
        self._trainer: pl.Trainer | None = None
        self._figures_step: int | None = None

    # --------------------------------------------------------------------------------- public read access
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, save_dir=str(self._save_dir_arg))

    # --------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        interval = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        self.options = replace(self.options, log_every_n_steps=interval)
        if self._save_dir_arg is None:
            self.save_dir = Path(trainer.log_dir or trainer.default_root_dir) / "gradlight"
        assert self.save_dir is not None
        if self.save_dir.exists() and not self.save_dir.is_dir():
            raise MisconfigurationException(
                f"GradientFlowMonitor(save_dir={str(self.save_dir)!r}) is a file; pass a folder path."
            )
        options = self.options
        spec = find_spec(pl_module)
        if spec is not None:
            group_by = spec.group_by if spec.group_by is not None else options.group_by
            options = replace(options, group_by=group_by, exclude=(*options.exclude, *spec.exclude))
        state = self.recorder.state_dict() if self.recorder is not None else self._state
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        self.recorder = GradientFlowRecorder(
            pl_module,
            self.save_dir,
            options,
            reduction=resolve_reduction(trainer.strategy, self.sharding),
            collectives=Collectives.from_lightning(trainer.strategy),
            gradient_clip_val=float(clip) if clip else None,
            gradient_clip_algorithm=str(getattr(algorithm, "value", algorithm) or "norm"),
            loss_scaled=getattr(trainer.precision_plugin, "scaler", None) is not None,  # fp16 AMP
            run_info=RunInfo(
                gradlight_version="",
                trainer="lightning",
                log_every_n_steps=interval,
                accumulate_grad_batches=trainer.accumulate_grad_batches,
                strategy=type(trainer.strategy).__name__,
                precision=str(trainer.precision),
                model=type(pl_module).__qualname__,
            ),
            discover_forward_order=False,  # from the first training batch, not the sanity-check validation
            warn=rank_zero_warn,
        )
        if "version" in state:
            self.recorder.load_state_dict(state)
        self.recorder.add_listener(self._log_summary)
        self._trainer = trainer

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._recorder().watch(optimizer)  # update ratios measured right after each optimizer step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:  # after every checkpoint restore, whatever the strategy: a resumed run continues its history
            self._recorder().open()
        except HistoryExistsError as error:
            raise MisconfigurationException(f"GradientFlowMonitor: {error}") from None

    def _recorder(self) -> GradientFlowRecorder:
        if self.recorder is None:
            raise MisconfigurationException("GradientFlowMonitor: used before `setup` (it records `fit` only).")
        return self.recorder

    # ------------------------------------------------------------------------------------ training hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._recorder().start_step(trainer.global_step)  # the optimizer step this micro-batch feeds

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.capture(trainer, optimizer)

    def capture(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """Read ``optimizer``'s gradients now if this optimizer step is logged (used by the mixin too)."""
        recorder = self.recorder
        if recorder is None:
            return
        step = trainer.global_step
        new = recorder.tracker.pending_step != step  # the mixin may have captured this step already
        backward_scale = backward_scale_of(getattr(trainer.precision_plugin, "scaler", None))  # fp16 AMP
        # Lightning unscales before this hook, except for optimizers that unscale inside step() (fused ones).
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        captured = recorder.capture(
            step, optimizer, grad_scale=backward_scale if fused else 1.0, backward_scale=backward_scale
        )
        if captured and new and self.log_histograms and trainer.is_global_zero and trainer.loggers:
            from gradlight.report.loggers import log_gradient_histograms

            gradients = recorder.tracker.pending_gradients()
            log_gradient_histograms(trainer.loggers, gradients, step, warned=self._logger_warnings)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A step still pending here was skipped by the optimizer (AMP found inf/NaN): the parameters did not move.
        recorder = self._recorder()
        recorder.end_step(_loss_of(outputs))
        if recorder.should_stop:
            trainer.should_stop = True

    # ------------------------------------------------------------------------------- where results go
    def _log_summary(self, record: StepRecord) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.loggers or self.recorder is None:
            return
        metrics = self.recorder.summary_metrics(record, per_layer=self.log_per_layer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.step)

    def flush(self) -> None:
        """Write buffered records to disk now (rank zero; a no-op elsewhere)."""
        if self.recorder is not None:
            self.recorder.flush()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()  # also removes the optimizer hooks of `watch`

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.log_figures_every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._log_figures(trainer)

    def _log_figures(self, trainer: pl.Trainer) -> None:
        """Heat map and profile to the loggers that take images (rank zero, from the flushed history)."""
        from gradlight.report.loggers import log_figures, logger_kind  # matplotlib only when figures are sent

        recorder = self.recorder
        if not (trainer.is_global_zero and recorder is not None and recorder.records_written and self.save_dir):
            return
        if self._figures_step == trainer.global_step:
            return  # already sent at this step (the last epoch's end is also the end of fit)
        if not any(logger_kind(logger) != "none" for logger in trainer.loggers):
            return
        self.flush()
        log_figures(
            trainer.loggers,
            self.save_dir,
            trainer.global_step,
            findings=recorder.findings,
            prefix=LOG_PREFIX,
            warned=self._logger_warnings,
        )
        self._figures_step = trainer.global_step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.pause_activations()  # validation between micro-batches is not training

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
        self._close()

    # ------------------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.recorder is not None:
            return self.recorder.state_dict()
        return {"version": 1, "forward_order": None, "diagnosis": None, **self._state}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        legacy = type(self).__qualname__  # the key of checkpoints written before `state_key` existed
        if self.state_key not in states and legacy in states:
            self.load_state_dict(states[legacy])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = dict(state_dict)
        if self.recorder is not None:
            self.recorder.load_state_dict(state_dict)


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) else None
