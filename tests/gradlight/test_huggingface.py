"""The Hugging Face Trainer integration, on a tiny GPT-2 built from a config (no download)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradlight import GLOBAL_LAYER, load_findings, load_history, read_run_info
from gradlight.integrations.huggingface import GradientFlowCallback

STEPS, ACCUMULATE, BATCH, MAX_GRAD_NORM = 4, 2, 4, 0.5


class Tokens(Dataset):  # type: ignore[type-arg]
    def __init__(self, samples: int = 32, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (samples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Logs(TrainerCallback):  # type: ignore[misc]
    """What the Trainer itself logged, and how many micro-batches it ran."""

    def __init__(self) -> None:
        self.grad_norm: dict[int, float] = {}
        self.substeps = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "grad_norm" in logs:
            self.grad_norm[state.global_step] = float(logs["grad_norm"])

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.substeps += 1


def train(out: Path, callbacks: list[Any]) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS,
        learning_rate=1e-2,
        max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train()
    assert args.max_grad_norm == MAX_GRAD_NORM, "the callback restores the Trainer's clipping setting"
    return model


@pytest.mark.slow
def test_one_record_per_optimizer_step_with_the_trainers_pre_clip_norm(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logs = Logs()
    callback = GradientFlowCallback(tmp_path / "gl", log_every_n_steps=1, group_by=3)
    recorded_model = train(tmp_path / "run", [logs, callback])

    history = load_history(tmp_path / "gl")
    steps = list(range(1, STEPS + 1))  # the Trainer's global_step after each optimizer step
    assert sorted(history.step.unique()) == steps  # one record per optimizer step, not per batch
    assert logs.substeps == STEPS * (ACCUMULATE - 1)  # the run really accumulated
    # The two logs join on `step` as they are: no shift.
    norms = history[history.metric == "global_grad_l2"][["step", "value"]]
    trainer = pd.DataFrame({"step": list(logs.grad_norm), "grad_norm": list(logs.grad_norm.values())})
    joined = norms.merge(trainer, on="step", how="outer", validate="one_to_one")
    assert joined.step.tolist() == steps and joined.notna().all().all()
    np.testing.assert_allclose(joined.value, joined.grad_norm, rtol=1e-6)
    assert joined.grad_norm.max() > MAX_GRAD_NORM  # clipping was active: the norms are pre-clip ones

    layers = history[(history.metric == "grad_l2") & (history.layer != GLOBAL_LAYER)]
    assert {"transformer.h.0", "transformer.h.1", "transformer.wte"} <= set(layers.layer)
    info = read_run_info(tmp_path / "gl")
    assert info is not None and (info.trainer, info.accumulate_grad_batches) == ("huggingface", ACCUMULATE)
    assert info.gradient_clip_val == MAX_GRAD_NORM and info.extra["clipped_by"] == "gradlight"
    load_findings(tmp_path / "gl")  # readable (possibly empty) findings

    # Taking the clipping over changes nothing in the training itself: the same weights as without gradlight.
    reference_model = train(tmp_path / "reference", [])
    for (name, recorded), (_, reference) in zip(recorded_model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(recorded, reference, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_the_backward_signal_is_tapped_on_logged_steps_and_no_hook_stays(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    callback = GradientFlowCallback(tmp_path / "gl", log_every_n_steps=2, group_by=3, track_backward_signal=True)
    model = train(tmp_path / "run", [callback])

    history = load_history(tmp_path / "gl")
    signal = history[history.metric == "signal_l2"]
    assert sorted(signal.step.unique()) == [2, 4]  # logged steps only (the Trainer's steps: 1 to STEPS)
    assert {"transformer.h.0", "transformer.h.1"} <= set(signal.layer)
    assert set(signal.layer) <= set(history[history.metric == "grad_l2"].layer)  # blocks = layers of the grouping
    assert (signal.value > 0).all() and np.isfinite(signal.value).all()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _signal_through_the_callback(save_dir: Path, scaler: torch.amp.GradScaler | None) -> np.ndarray:
    """``signal_l2`` of 3 steps, the callback driven in the Trainer's order with accelerate's optimizer wrapper.

    Under fp16 on a GPU the Trainer's ``AcceleratedOptimizer`` holds a ``GradScaler`` (on CPU accelerate has
    none); here it holds a CPU one, the loss is scaled by it and the gradients unscaled before the callback
    reads them, as the Trainer's norm does.
    """
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(save_dir), use_cpu=True, report_to=[], max_grad_norm=0.0)
    Accelerator(cpu=True)  # accelerate's state, which its optimizer wrapper reads (set up after the arguments)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    state, control = TrainerState(), TrainerControl()
    callback = GradientFlowCallback(save_dir / "gl", log_every_n_steps=1, group_by=3, track_backward_signal=True)
    callback.on_train_begin(args, state, control, model=model)
    ids = Tokens().ids[:BATCH]
    for step in range(3):
        state.global_step = step
        callback.on_step_begin(args, state, control)
        loss = model(input_ids=ids, labels=ids).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(inner)
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()  # with a scaler: its step and update()
        callback.on_optimizer_step(args, state, control)
        callback.on_step_end(args, state, control)
        optimizer.zero_grad()
    callback.on_train_end(args, state, control, model=model)
    history = load_history(save_dir / "gl")
    signal = history[history.metric == "signal_l2"]
    return signal.pivot(index="step", columns="layer", values="value").to_numpy()


def test_under_fp16_the_trainers_loss_scale_is_divided_out_of_the_signal(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # another scale every step
    scaled = _signal_through_the_callback(tmp_path / "scaled", scaler)
    plain = _signal_through_the_callback(tmp_path / "plain", None)
    assert scaler.get_scale() == 2.0**13
    np.testing.assert_allclose(scaled, plain, rtol=1e-6)  # a power-of-two scale changes no rounding
