"""Record a Hugging Face ``transformers.Trainer`` run: :class:`GradientFlowCallback`.

The Trainer clips gradients *before* its first callback event of an optimizer step
(``on_pre_optimizer_step``), and no event runs between the last backward pass and the clipping. To read the
gradients before clipping, the callback takes the clipping over for the run: on ``on_train_begin`` it sets
``args.max_grad_norm`` to 0 (restored on ``on_train_end``), so the Trainer only measures the pre-clip norm
it logs as ``grad_norm`` (after AMP unscaling), and the callback clips with ``torch.nn.utils.clip_grad_norm_``
and the original threshold right after reading, before ``optimizer.step()``, as the Trainer would have.
Under DeepSpeed or FSDP, where the Trainer's clipping is the engine's own, the callback leaves clipping to
the Trainer and reads the clipped gradients (and says so once).

Per optimizer step (one per ``gradient_accumulation_steps`` micro-batches): ``on_step_begin`` starts the
forward-order discovery, the activation taps and the backward-signal taps (before the step's first
micro-batch), ``on_pre_optimizer_step`` reads the gradients,
``on_optimizer_step`` measures the update ratios, ``on_step_end`` diagnoses and writes the record. The
``step`` of a record is the Trainer's own: ``state.global_step`` after the optimizer step (1 for the first
one), the step at which the Trainer logs that optimizer step's ``grad_norm`` and loss, so the two logs join
on ``step`` (gradlight's ``global_grad_l2`` is the Trainer's ``grad_norm``). With ``log_every_n_steps``
equal to ``logging_steps`` (the default) both record the same steps. The run folder is the same as the
Lightning monitor's (``gradlight report`` works on it).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from typing_extensions import override

from gradlight import __version__
from gradlight.amp import backward_scale_of
from gradlight.options import RecorderOptions
from gradlight.recorder import Collectives, GradientFlowRecorder
from gradlight.runfolder import RunInfo
from gradlight.tracker import StepRecord
from gradlight.validation import check_bool, check_path, check_positive_int

__all__ = ["GradientFlowCallback"]


class GradientFlowCallback(TrainerCallback):  # type: ignore[misc]
    """A ``transformers.TrainerCallback`` recording per-layer gradient statistics at every logged optimizer step.

    Args:
        save_dir: The run folder; ``None`` uses ``<args.output_dir>/gradlight``.
        log_every_n_steps: Record every this many optimizer steps; ``None`` uses ``options``' interval if
            ``options`` is given, else ``args.logging_steps`` (50 when that is a fraction of the run).
        take_over_clipping: Read the gradients before clipping by clipping in the callback (see the module
            docstring). ``False`` leaves the Trainer's clipping alone and records clipped gradients.
        options: What to record and how (:class:`gradlight.RecorderOptions`, where each option is documented);
            ``None`` takes the defaults. ``on_anomaly="stop"`` ends training through ``control``. Under
            ``fp16`` the backward signal (``track_backward_signal``) carries the loss scale of the Trainer's
            ``GradScaler``: it is read from the ``AcceleratedOptimizer`` before its step (and update) and
            divided out.
        **option_values: Options to set on top of ``options``, by name, e.g. ``group_by=3`` (one layer per
            GPT-2 block, ``transformer.h.0``).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=2))
        >>> args = TrainingArguments("runs/gpt2", gradient_accumulation_steps=2, report_to=[])  # doctest: +SKIP
        >>> callback = GradientFlowCallback(log_every_n_steps=10)
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> load_history("runs/gpt2/gradlight")  # doctest: +SKIP
    """

    def __init__(
        self,
        save_dir: str | Path | None = None,
        log_every_n_steps: int | None = None,
        *,
        take_over_clipping: bool = True,
        options: RecorderOptions | None = None,
        **option_values: Any,
    ) -> None:
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_path("save_dir", save_dir)
        check_bool("take_over_clipping", take_over_clipping)
        if log_every_n_steps is not None:
            option_values["log_every_n_steps"] = log_every_n_steps
        self.options = RecorderOptions.build(options, **option_values)  # validated now, not when training starts
        # ``None``: the Trainer's logging_steps, unless ``options`` sets the interval.
        self.log_every_n_steps = log_every_n_steps if options is None else self.options.log_every_n_steps
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.take_over_clipping = take_over_clipping
        #: The recorder of the current (or last) run; ``None`` before ``on_train_begin``.
        self.recorder: GradientFlowRecorder | None = None
        self._clip: float | None = None  # the threshold the callback applies after reading
        self._restore_max_grad_norm: float | None = None
        self._model: nn.Module | None = None

    @property
    def latest(self) -> StepRecord | None:
        """The most recent record, or ``None`` before the first logged step."""
        return None if self.recorder is None else self.recorder.latest

    @override
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        interval = self.log_every_n_steps
        if interval is None:
            steps = args.logging_steps
            interval = int(steps) if steps >= 1 and float(steps).is_integer() else 50
        save_dir = self.save_dir if self.save_dir is not None else Path(args.output_dir or ".") / "gradlight"
        clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        engine = bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None))
        self._clip = None
        if clip is not None and self.take_over_clipping:
            if engine:
                warnings.warn(
                    "gradlight: under DeepSpeed/FSDP the Trainer's clipping is the engine's own; gradients are "
                    "recorded after clipping",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                self._clip, self._restore_max_grad_norm = clip, args.max_grad_norm
                args.max_grad_norm = 0.0  # the Trainer now only measures the pre-clip norm; we clip after reading
        precision = "fp16-mixed" if args.fp16 else "bf16-mixed" if args.bf16 else "32-true"
        collectives = Collectives.from_torch_distributed()
        self.recorder = GradientFlowRecorder(
            model,
            save_dir,
            replace(self.options, log_every_n_steps=interval),
            collectives=collectives,
            gradient_clip_val=clip,
            gradient_clip_algorithm="norm",
            loss_scaled=bool(args.fp16),
            run_info=RunInfo(
                gradlight_version=__version__,
                trainer="huggingface",
                log_every_n_steps=interval,
                accumulate_grad_batches=int(args.gradient_accumulation_steps),
                strategy=str(getattr(args.parallel_mode, "value", args.parallel_mode)),
                precision=precision,
                extra={"max_grad_norm": clip, "clipped_by": "gradlight" if self._clip else "trainer"},
            ),
        )
        self._model = model
        if state.global_step > 0:  # resumed from a Trainer checkpoint: continue the history from here
            self.recorder.resume_at(_trainer_step(state))

    @override
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is not None:
            self.recorder.start_step(_trainer_step(state))

    @override
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        optimizer = kwargs["optimizer"]
        # The gradients are AMP-unscaled by the Trainer's norm; the tapped signal is not. Under fp16 accelerate's
        # AcceleratedOptimizer holds the Trainer's GradScaler, whose update() runs inside its step(), after this.
        scale = backward_scale_of(getattr(optimizer, "scaler", None))
        recorder.capture(_trainer_step(state), optimizer, backward_scale=scale)
        if self._clip is not None and self._model is not None:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._clip)

    @override
    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is not None:
            self.recorder.after_step()

    @override
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        recorder.end_step()
        if recorder.should_stop:
            control.should_training_stop = True

    @override
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # the history up to the checkpoint is on disk before training goes on

    @override
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self._restore_max_grad_norm is not None:
            args.max_grad_norm = self._restore_max_grad_norm
            self._restore_max_grad_norm = None


def _trainer_step(state: TrainerState) -> int:
    """The step a record of the optimizer step under way gets: the Trainer's ``global_step`` once it is taken.

    The Trainer increments ``state.global_step`` after ``optimizer.step()`` and logs ``grad_norm`` and the
    loss under the new value; recording under it too makes gradlight's history join the Trainer's logs.
    """
    return int(state.global_step) + 1
