"""Two CPU processes (gloo) must record exactly what one process records on the same global batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest

from gradlight import GradientFlowMonitor, load_history
from tests.gradlight.models import Net

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class DumpLatest(L.Callback):
    """Writes what each rank's monitor computed last, since ddp_spawn does not return callback state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, GradientFlowMonitor))
        record = monitor.latest
        assert record is not None
        payload = {"step": record.step, "grad_l2": record.metrics["grad_l2"].tolist()}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


class OpenStepWindow(L.Callback):
    """First callback: counts the collectives of each optimizer step from its hook on (backward is over)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from tests._distributed import CollectiveCounter

        self.counter = CollectiveCounter()  # wraps torch.distributed in this (spawned) process

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.counter.window = 0


class CloseStepWindow(L.Callback):
    """Last callback: after the monitor's ``on_train_batch_end``, writes each step's count at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        opener = next(c for c in trainer.callbacks if isinstance(c, OpenStepWindow))
        self.counts.append(opener.counter.window)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.folder / f"collectives{trainer.global_rank}.json").write_text(json.dumps(self.counts))


@pytest.mark.slow
def test_two_process_ddp_history_equals_single_process(tmp_path: Path) -> None:
    per_rank_batch = 8
    single = tmp_path / "single"
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=4, callbacks=[GradientFlowMonitor(1, single)]).fit(
        Net("mlp", batch_size=2 * per_rank_batch)
    )
    ddp = tmp_path / "ddp"
    trainer: Any = L.Trainer(
        **QUIET,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        max_steps=4,
        callbacks=[OpenStepWindow(), GradientFlowMonitor(1, ddp), DumpLatest(tmp_path), CloseStepWindow(tmp_path)],
    )
    trainer.fit(Net("mlp", batch_size=per_rank_batch))

    expected, recorded = load_history(single), load_history(ddp)
    assert len(list((ddp / "history").glob("segment-*.arrow"))) == 1, "only rank zero writes"
    key = ["step", "layer", "metric"]
    merged = expected.merge(recorded, on=key, suffixes=("_single", "_ddp"))
    assert len(merged) == len(expected) == len(recorded)
    for metric in ("grad_l2", "grad_max_abs", "param_l2", "update_ratio", "global_grad_l2"):
        rows = merged[merged.metric == metric]
        np.testing.assert_allclose(rows.value_ddp, rows.value_single, rtol=1e-5, err_msg=metric)

    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1, "every rank computes the same statistics"
    for rank in (0, 1):  # DDP gradients are already averaged: a logged step costs no collective at all
        assert json.loads((tmp_path / f"collectives{rank}.json").read_text()) == [0, 0, 0, 0]
