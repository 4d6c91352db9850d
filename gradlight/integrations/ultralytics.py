"""Record any Ultralytics ``YOLO(...).train(...)`` run with gradlight.

Ultralytics' trainer has no usable hook between the backward pass and the optimizer step: its
``optimizer_step`` / ``on_before_zero_grad`` callbacks are never run, ``on_train_batch_end`` fires after
``zero_grad``, and per-parameter hooks see AMP-scaled gradients. :class:`GradientFlowDetectionTrainer`
therefore overrides ``DetectionTrainer.optimizer_step`` with the same sequence (unscale, clip at
:data:`CLIP_VALUE`, step, update the scaler, zero_grad, EMA) and reads the gradients between unscaling and
clipping. The norm the clipping computes is kept as the global metric ``clip_norm``. One record per
optimizer step, whatever Ultralytics' accumulation (``nbs``); under Ultralytics' DDP the gradients are
averaged, so rank zero records alone, issuing no collective; its backward signal is its own slice of the
global batch's (the loss Ultralytics scales by the world size is divided back). That path needs CUDA and
has not run here. The run folder is the Lightning monitor's (``gradlight report``
works on it); its default is ``<Ultralytics run folder>/gradlight``.

The one call::

    from ultralytics import YOLO
    from gradlight.integrations.ultralytics import train

    results = train(YOLO("yolo11n.yaml"), data="coco8.yaml", epochs=10, log_every_n_steps=10)

Settings reach Ultralytics' DDP worker processes (which rebuild the trainer from its class) through the
environment variable :data:`SETTINGS_ENV`, so they must be JSON values (``group_by`` an int or ``None``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, RANK
from ultralytics.utils.torch_utils import unwrap_model

from gradlight import __version__
from gradlight.amp import backward_scale_of
from gradlight.diagnosis import DiagnosisConfig
from gradlight.options import RecorderOptions
from gradlight.recorder import Collectives, GradientFlowRecorder
from gradlight.runfolder import RunFolder, RunInfo

__all__ = ["CLIP_VALUE", "SETTINGS_ENV", "GradientFlowDetectionTrainer", "UltralyticsRecording", "train"]

#: Ultralytics' hard-coded ``clip_grad_norm_`` threshold in ``BaseTrainer.optimizer_step``.
CLIP_VALUE = 10.0
#: Environment variable carrying :class:`UltralyticsRecording` (JSON) to the trainer and its DDP workers.
SETTINGS_ENV = "GRADLIGHT_ULTRALYTICS"


@dataclass(init=False)
class UltralyticsRecording:
    """How :class:`GradientFlowDetectionTrainer` records (JSON-serialisable, for Ultralytics' DDP workers).

    Args:
        save_dir: The run folder; ``None`` uses ``<trainer.save_dir>/gradlight``.
        prefix: Put the ``DetectionModel`` under this attribute name for naming (``"model"`` gives
            ``model.model.0``, the names of a LightningModule holding it as ``.model``).
        options: What to record and how (:class:`gradlight.RecorderOptions`, where each option is documented);
            ``None`` takes the defaults with ``log_every_n_steps=10``. ``group_by`` must be ``None`` or an int
            (``2`` is one layer per YOLO block, ``model.7``): the settings travel as JSON. Under AMP the
            backward signal (``track_backward_signal``) carries the loss scale the backward ran with; it is
            read before the scaler's update and divided out. ``on_anomaly="stop"`` sets the trainer's
            ``stop``: the run ends after the current epoch, all ranks.
        **option_values: Options to set on top of ``options``, by name.

    Example:
        >>> recording = UltralyticsRecording(log_every_n_steps=5, group_by=2)
        >>> recording.to_json()[:27]
        '{"save_dir": null, "prefix"'
        >>> UltralyticsRecording.from_json(recording.to_json()) == recording
        True
    """

    save_dir: str | None
    prefix: str
    options: RecorderOptions

    def __init__(
        self,
        save_dir: str | None = None,
        prefix: str = "",
        options: RecorderOptions | None = None,
        **option_values: Any,
    ) -> None:
        if options is None:
            option_values.setdefault("log_every_n_steps", 10)
        self.options = RecorderOptions.build(options, **option_values)
        group_by = self.options.group_by
        if group_by is not None and (isinstance(group_by, bool) or not isinstance(group_by, int)):
            raise ValueError(f"`group_by` must be an int or None (a JSON value for DDP), got {group_by!r}.")
        if not isinstance(prefix, str) or "." in prefix:
            raise ValueError(f"`prefix` must be one attribute name without dots, got {prefix!r}.")
        if save_dir is not None and not isinstance(save_dir, str):
            raise ValueError(f"`save_dir` must be a str or None (a JSON value for DDP), got {save_dir!r}.")
        self.save_dir, self.prefix = save_dir, prefix

    def to_json(self) -> str:
        """The settings as JSON (what :data:`SETTINGS_ENV` holds)."""
        options = {name: getattr(self.options, name) for name in RecorderOptions.names()}
        options["exclude"] = list(self.options.exclude)
        diagnosis, on_anomaly = self.options.diagnosis, self.options.on_anomaly
        options["diagnosis"] = asdict(diagnosis) if diagnosis is not None else None
        options["on_anomaly"] = dict(on_anomaly) if isinstance(on_anomaly, Mapping) else on_anomaly
        return json.dumps({"save_dir": self.save_dir, "prefix": self.prefix, "options": options})

    @classmethod
    def from_json(cls, text: str) -> UltralyticsRecording:
        """The settings :meth:`to_json` wrote."""
        data = json.loads(text)
        options = dict(data.pop("options"))
        diagnosis = options.get("diagnosis")
        options["diagnosis"] = DiagnosisConfig(**diagnosis) if diagnosis is not None else None
        return cls(**data, options=RecorderOptions(**options))

    @classmethod
    def from_env(cls) -> UltralyticsRecording:
        """The settings in :data:`SETTINGS_ENV`, or the defaults when it is not set."""
        text = os.environ.get(SETTINGS_ENV)
        return cls.from_json(text) if text else cls()


class _Named(nn.Module):
    """Holds the detector under ``prefix`` so that parameter names carry it (``model.model.0``)."""

    def __init__(self, prefix: str, detector: nn.Module) -> None:
        super().__init__()
        self.add_module(prefix, detector)


class GradientFlowDetectionTrainer(DetectionTrainer):  # type: ignore[misc]
    """Ultralytics' ``DetectionTrainer`` recording per-layer gradient statistics, diagnosis and history.

    Pass it to ``YOLO(...).train(trainer=GradientFlowDetectionTrainer, ...)``, or call :func:`train`, which
    also sets the recording options. Subclass it (e.g. ``get_model``) like any Ultralytics trainer.

    Args:
        cfg: Ultralytics cfg (defaults to ``DEFAULT_CFG``).
        overrides: Ultralytics overrides (``model``, ``data``, ``epochs``, ...).
        _callbacks: Ultralytics callbacks.
        recording: How to record; ``None`` reads :data:`SETTINGS_ENV` (how DDP workers get it).

    Attributes:
        recorder: The run's :class:`gradlight.GradientFlowRecorder` (rank zero, from ``on_train_start``).
        optimizer_steps: Optimizer steps taken (the ``step`` of the records).
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict[str, Any] | None = None,
        recording: UltralyticsRecording | None = None,
    ) -> None:
        self.recording = recording if recording is not None else UltralyticsRecording.from_env()
        os.environ[SETTINGS_ENV] = self.recording.to_json()  # Ultralytics' DDP workers rebuild this trainer
        self.recorder: GradientFlowRecorder | None = None
        self.optimizer_steps = 0
        super().__init__(cfg, overrides, _callbacks)

    @property
    def gradlight_dir(self) -> Path:
        """The run folder of the recording."""
        given = self.recording.save_dir
        return Path(given) if given is not None else Path(self.save_dir) / "gradlight"

    # ------------------------------------------------------------------------------------------ events
    def run_callbacks(self, event: str) -> None:
        """Drive the recorder from Ultralytics' events (methods, not callbacks: DDP pickles the callbacks)."""
        handler = getattr(self, f"_gradlight_{event}", None)
        if handler is not None and RANK in {-1, 0}:
            handler()
        super().run_callbacks(event)

    def _gradlight_on_train_start(self) -> None:
        detector = unwrap_model(self._module())
        model = _Named(self.recording.prefix, detector) if self.recording.prefix else detector
        world = max(int(self.world_size), 1)
        self.recorder = GradientFlowRecorder(
            model,
            self.gradlight_dir,
            self.recording.options,
            gradient_clip_val=CLIP_VALUE,
            gradient_clip_algorithm="norm",
            loss_scaled=bool(self.amp),
            grad_scaler=None,  # optimizer_step unscales before reading
            collectives=Collectives(),  # only rank zero records: a collective would wait for the others forever
            run_info=RunInfo(
                gradlight_version=__version__,
                trainer="ultralytics",
                log_every_n_steps=self.recording.options.log_every_n_steps,
                accumulate_grad_batches=int(self.accumulate),
                world_size=world,  # DDP ranks other than zero do not record
                strategy="ultralytics-ddp" if world > 1 else "ultralytics",
                precision="16-mixed" if self.amp else "32-true",
                model=type(detector).__qualname__,
                extra={"clip_value": CLIP_VALUE, "nbs": int(self.args.nbs)},
            ),
        )
        state_file = RunFolder(self.gradlight_dir).state_file
        if self.start_epoch and state_file.is_file():  # Ultralytics' resume: continue the same history
            state = torch.load(state_file, weights_only=False)
            self.optimizer_steps = int(state["optimizer_steps"])
            self.recorder.load_state_dict(state["recorder"])
        elif self.start_epoch:
            warnings.warn(
                f"gradlight: resuming without {state_file}: the history restarts its diagnosis, steps count on "
                "from the resumed epoch's first batch",
                UserWarning,
                stacklevel=2,
            )
            self.optimizer_steps = self.start_epoch * len(self.train_loader) // max(int(self.accumulate), 1)
            self.recorder.resume_at(self.optimizer_steps)
        self.recorder.open()

    def _gradlight_on_train_batch_start(self) -> None:
        if self.recorder is not None:
            self.recorder.start_step(self.optimizer_steps)

    def _gradlight_on_train_epoch_end(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()

    def _gradlight_on_model_save(self) -> None:
        """Right after Ultralytics saved ``last.pt``: the recorder state a resume of it continues from."""
        if self.recorder is not None:
            self.recorder.flush()
            path = RunFolder(self.gradlight_dir).state_file
            tmp = path.with_suffix(".tmp")
            torch.save({"optimizer_steps": self.optimizer_steps, "recorder": self.recorder.state_dict()}, tmp)
            os.replace(tmp, path)

    def _gradlight_on_train_end(self) -> None:
        self._close_recorder()

    def _gradlight_teardown(self) -> None:
        self._close_recorder()

    def _close_recorder(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------------------------ optimizer step
    def _module(self) -> nn.Module:
        """``self.model`` once set up (Ultralytics types it as the model's name or path before)."""
        model = self.model
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"the trainer's model is not built yet (it is {model!r})")
        return model

    def optimizer_step(self) -> None:
        """Ultralytics' step (unscale, clip at 10, step, zero_grad, EMA) with gradients read before clipping."""
        recorder = self.recorder if RANK in {-1, 0} else None
        optimizer = self.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):  # Ultralytics declares it Optional
            raise RuntimeError("optimizer_step() before the optimizer was built")
        # The backward ran on the AMP-scaled loss (the scale is read before update()), and under DDP on the loss
        # times the world size (Ultralytics' compensation for DDP's gradient averaging): dividing both out of
        # rank zero's tapped signal leaves its slice of the global batch's signal, and its loss.
        ddp_factor = float(self.world_size) if RANK != -1 else 1.0
        backward_scale = ddp_factor * backward_scale_of(self.scaler)
        self.scaler.unscale_(optimizer)
        step = self.optimizer_steps
        if recorder is not None:
            recorder.capture(step, optimizer, backward_scale=backward_scale)
        clip_norm = torch.nn.utils.clip_grad_norm_(self._module().parameters(), max_norm=CLIP_VALUE)
        self.scaler.step(optimizer)
        self.scaler.update()
        if recorder is not None:
            recorder.after_step()
        optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)
        self.optimizer_steps += 1
        if recorder is not None:
            loss = self.loss.detach().sum() / ddp_factor if isinstance(self.loss, torch.Tensor) else None
            recorder.end_step(loss, metrics={"clip_norm": float(clip_norm)})
            if recorder.should_stop:
                self.stop = True  # Ultralytics broadcasts it to every rank at the epoch's end


def train(
    yolo: Any,
    *,
    save_dir: str | Path | None = None,
    log_every_n_steps: int = 10,
    group_by: int | None = None,
    exclude: Sequence[str] = (),
    diagnose: bool = True,
    diagnosis: Mapping[str, Any] | None = None,
    on_anomaly: str | Mapping[str, str] = "warn",
    track_backward_signal: bool = False,
    trainer: type[GradientFlowDetectionTrainer] = GradientFlowDetectionTrainer,
    **train_kwargs: Any,
) -> Any:
    """``yolo.train(**train_kwargs)`` recorded by gradlight; returns what ``YOLO.train`` returns.

    Args:
        yolo: An ``ultralytics.YOLO`` detection model (e.g. ``YOLO("yolo11n.yaml")``).
        save_dir: The run folder; ``None`` is ``<Ultralytics run folder>/gradlight``.
        log_every_n_steps: A recording option (:class:`gradlight.RecorderOptions`, where each is documented).
        group_by: A recording option: ``None`` or an int here (see :class:`UltralyticsRecording`).
        exclude: A recording option.
        diagnose: A recording option.
        diagnosis: :class:`gradlight.DiagnosisConfig` fields to override.
        on_anomaly: A recording option (see :class:`UltralyticsRecording` for ``"stop"``).
        track_backward_signal: A recording option.
        trainer: The trainer class (a subclass of :class:`GradientFlowDetectionTrainer`).
        **train_kwargs: Ultralytics' training arguments (``data``, ``epochs``, ``imgsz``, ...).

    Example:
        >>> from ultralytics import YOLO  # doctest: +SKIP
        >>> train(YOLO("yolo11n.yaml"), data="coco8.yaml", epochs=3, log_every_n_steps=5)  # doctest: +SKIP
    """
    if not (isinstance(trainer, type) and issubclass(trainer, GradientFlowDetectionTrainer)):
        raise ValueError(f"`trainer` must be a subclass of GradientFlowDetectionTrainer, got {trainer!r}.")
    recording = UltralyticsRecording(
        save_dir=str(save_dir) if save_dir is not None else None,
        log_every_n_steps=log_every_n_steps,
        group_by=group_by,
        exclude=tuple(exclude),
        diagnose=diagnose,
        diagnosis=DiagnosisConfig(**diagnosis) if diagnosis else None,
        on_anomaly=on_anomaly,
        track_backward_signal=track_backward_signal,
    )
    previous = os.environ.get(SETTINGS_ENV)
    os.environ[SETTINGS_ENV] = recording.to_json()  # read by the trainer and by Ultralytics' DDP workers
    try:
        return yolo.train(trainer=trainer, **train_kwargs)
    finally:
        if previous is None:
            os.environ.pop(SETTINGS_ENV, None)
        else:
            os.environ[SETTINGS_ENV] = previous
