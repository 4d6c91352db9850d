"""The Lightning callback: *when* gradients are read, and *where* the results go.

The statistics themselves come from :class:`gradlight.tracker.GradientFlowTracker` (Trainer-free); this file
only schedules it from Lightning's hooks, sends a small summary to the Trainer's loggers, and appends every
record to the durable history on disk.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from gradlight import __version__
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
    ) -> None:
        super().__init__()
        _check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        _check_positive_int("edge_layers", edge_layers)
        _check_positive_int("flush_every_n_records", flush_every_n_records)
        validate_group_by(group_by)
        if isinstance(exclude, str):
            raise ValueError(
                f"`exclude` must be a sequence of patterns, not a single string: got {exclude!r}."
            )
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
        if isinstance(sharding, str) and sharding not in SHARDING_MODES:
            raise ValueError(
                f"`sharding` must be one of {SHARDING_MODES} or a CrossRankReduction, got {sharding!r}."
            )
        self.sharding = sharding

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

    # --------------------------------------------------------------------------------- public read access
    @property
    def latest(self) -> StepRecord | None:
        """The most recent record (on every rank), or ``None`` before the first logged step."""
        return None if self.tracker is None else self.tracker.latest

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
        self._interval = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))
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

    def _build_tracker(
        self, pl_module: pl.LightningModule, spec: GradientFlowSpec | None
    ) -> GradientFlowTracker:
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
        step = trainer.global_step
        if tracker.pending:
            if tracker.pending_step == step:
                return  # already captured for this step (e.g. by the mixin under manual optimization)
            self._finish(trainer)
        if not self.is_logged_step(step) or step <= self.last_recorded_step:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tracker.capture(
            step, params, grad_scale=_amp_scale_left_in_grads(trainer, optimizer), owner=optimizer
        )
        self._trainer = trainer

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

    def _emit(self, trainer: pl.Trainer) -> None:
        record, self._unwritten = self._unwritten, None
        if record is not None and trainer.is_global_zero:
            self._write(record)
            self._log_summary(trainer, record)

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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.step)

    def flush(self) -> None:
        """Write buffered records to disk now (rank zero; a no-op elsewhere)."""
        if self._writer is not None:
            self._writer.flush()
        self._records_since_flush = 0

    def _close(self) -> None:
        if self._unwritten is not None and self._trainer is not None:
            self._emit(self._trainer)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.flush()  # everything up to the checkpoint is on disk before the checkpoint is

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tracker is not None:
            self.tracker.stop_discovery()
            self.tracker.discard()
        self._close()

    # ------------------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        order = self.tracker.forward_order if self.tracker is not None else self._restored_order
        return {
            "version": 1,
            "last_recorded_step": self.last_recorded_step,
            "records_written": self.records_written,
            "forward_order": list(order) if order is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_recorded_step = int(state_dict.get("last_recorded_step", -1))
        self.records_written = int(state_dict.get("records_written", 0))
        order = state_dict.get("forward_order")
        self._restored_order = list(order) if order is not None else None
        if self.tracker is not None and self._restored_order is not None:
            self.tracker.set_forward_order(self._restored_order)
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
