"""Top-level workers and loops for the recorder tests: a plain PyTorch loop and a Lightning Fabric loop.

Workers are started by :func:`tests.gradlight._dist_workers.spawn` (``torch.multiprocessing``), set the
torch.distributed environment themselves and write what they saw to files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradlight import GradientFlowRecorder
from tests.gradlight._dist_workers import init_env
from tests.gradlight.models import make_dataset, sigmoid_mlp

GLOBAL_BATCH, SAMPLES, STEPS = 8, 32, 4
RECORDER_KWARGS: dict[str, Any] = dict(log_every_n_steps=1, track_activations=True, on_anomaly="ignore")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return sigmoid_mlp(depth=8)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def dataset() -> TensorDataset:
    return make_dataset("mlp", samples=SAMPLES)


def train(
    recorder: GradientFlowRecorder,
    model: nn.Module,
    optimizer: Any,
    loader: DataLoader,
    backward: Any = None,
) -> None:
    """The loop every recorder test drives: start_step, forward, backward, capture, step, end_step."""
    for step, (x, y) in enumerate(loader):
        if step == STEPS:
            break
        recorder.start_step(step)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        recorder.capture(step, optimizer)
        optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
    recorder.close()


def single_process(save_dir: Path) -> GradientFlowRecorder:
    """The reference: one process, plain PyTorch, global batches."""
    model = make_model()
    optimizer = make_optimizer(model)
    recorder = GradientFlowRecorder(model, save_dir, **RECORDER_KWARGS)
    train(recorder, model, optimizer, DataLoader(dataset(), batch_size=GLOBAL_BATCH, shuffle=False))
    return recorder


def fabric_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a Fabric DDP run over the same global batches (rank r takes rows r, r + world, ...)."""
    init_env(rank, world, port)
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=world, strategy="ddp")
    fabric.launch()
    model = make_model()
    model, optimizer = fabric.setup(model, make_optimizer(model))
    sampler = DistributedSampler(dataset(), world, rank, shuffle=False)
    loader = DataLoader(dataset(), batch_size=GLOBAL_BATCH // world, sampler=sampler)
    recorder = GradientFlowRecorder.for_fabric(fabric, model, Path(out_dir) / "fabric", **RECORDER_KWARGS)
    train(recorder, model, optimizer, loader, backward=fabric.backward)
    latest = recorder.latest
    assert latest is not None
    summary = {
        "world_size": recorder.collectives.world_size,
        "global": latest.global_metrics,  # the loss too: the global-batch loss on every rank
        "findings": [[f.kind, f.layer, f.step] for f in recorder.findings],
        "layers": latest.layers,
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(summary))
