"""Every-step logging on small models, against a bare twin in the same process: where fixed costs dominate.

    python benchmarks/small_overhead.py                        # resnet18 at 32 px (about 2 min on a busy CPU)
    python benchmarks/small_overhead.py --models resnet18 yolo11n --steps 10

A plain PyTorch loop on one CPU thread. Each model is built twice with the same weights: a bare twin (no
monitor) and a monitored one, with :class:`gradlight.recorder.GradientFlowRecorder` logging every step with
the diagnosis on and the history written to a temporary run folder (what a user gets from
``GradientFlowRecorder(model, save_dir, log_every_n_steps=1)``). The two train on the same batches, one step
each in turn (the order swapped every step, so that drift and cache effects hit both alike). Printed per
model: the mean step of each twin, their ratio, and the time spent inside the recorder's calls (``capture``
before the optimizer step, ``end_step`` after it) per step and as a share of the bare step. Targets:
every-step logging at most 1.05x on resnet18 (32 px, batch 16) and at most 1.02x on yolo11n (320 px, batch 8),
judged on the in-recorder time over the bare step (whole-step ratios carry the machine's drift). Also printed:
the read floor, one norm over each gradient, parameter and momentum buffer (the least a recorder that
reports per-layer gradient, parameter and update norms must read on a logged step), over the bare step.

Models: ``resnet18`` (torchvision, 10 classes, 32 px, batch 16, SGD with momentum 0.9 and weight decay
5e-4), ``resnet18_zero_init`` (the same with ``zero_init_residual=True``), ``yolo11n`` (Ultralytics
``yolo11n.yaml``, 80 classes, its real loss on random images, 320 px, batch 8, SGD as above). Nothing
downloads.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch
from torch import Tensor, nn

from gradlight.recorder import GradientFlowRecorder

MODELS = ("resnet18", "resnet18_zero_init", "yolo11n")
TARGETS = {"resnet18": 1.05, "resnet18_zero_init": 1.05, "yolo11n": 1.02}


def build(name: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """The model and its loss on a fixed random batch."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name.startswith("resnet18"):
        import torchvision

        model = torchvision.models.resnet18(num_classes=10, zero_init_residual=name.endswith("zero_init"))
        images = torch.randn(16, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        return model, lambda m: nn.functional.cross_entropy(m(images), labels)
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    detector = DetectionModel("yolo11n.yaml", nc=80, verbose=False).train()
    detector.args = get_cfg(DEFAULT_CFG)
    batch, size, boxes = 8, 320, 24
    targets = {
        "img": torch.rand(batch, 3, size, size, generator=generator),
        "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([0.3 + 0.4 * torch.rand(boxes, 2), 0.1 + 0.2 * torch.rand(boxes, 2)], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(3).float(),
    }
    return detector, lambda m: m.loss(targets)[0].sum()


class Twin:
    """One copy of the model with its optimizer and, if monitored, its recorder; times its steps."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module], Tensor], save_dir: str | None) -> None:
        self.model, self.loss = model, loss
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.recorder = None if save_dir is None else GradientFlowRecorder(model, save_dir, log_every_n_steps=1)
        self.steps: list[float] = []
        self.inside: list[float] = []
        self.count = 0

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        loss = self.loss(self.model)
        loss.backward()
        inside = 0.0
        if self.recorder is not None:
            mark = time.perf_counter()
            self.recorder.capture(self.count, self.optimizer)
            inside += time.perf_counter() - mark
        self.optimizer.step()
        if self.recorder is not None:
            mark = time.perf_counter()
            self.recorder.end_step(loss)
            inside += time.perf_counter() - mark
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        if timed:
            self.steps.append(time.perf_counter() - start)
            self.inside.append(inside)


def measure(name: str, steps: int, warmup: int) -> dict[str, Any]:
    model, loss = build(name)
    twin = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as save_dir:
        bare, monitored = Twin(twin, loss, None), Twin(model, loss, save_dir)
        for i in range(warmup + steps):
            pair = (bare, monitored) if i % 2 == 0 else (monitored, bare)
            for side in pair:
                side.step(timed=i >= warmup)
        assert monitored.recorder is not None
        monitored.recorder.close()
        floor = read_floor(monitored)
        kernel = monitored.recorder.tracker.updates.kernel_info if monitored.recorder.tracker.updates else None
    plain, logged = statistics.mean(bare.steps), statistics.mean(monitored.steps)
    inside = statistics.mean(monitored.inside)
    return {
        "bare": plain,
        "bare_median": statistics.median(bare.steps),
        "monitored": logged,
        "inside": inside,
        "inside_median": statistics.median(monitored.inside),
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": sum(1 for _ in model.parameters()),
        "kernel": kernel or "",
        "floor": floor,
    }


def read_floor(twin: Twin, repeats: int = 5) -> float:
    """Median time of one norm over each gradient, parameter and momentum buffer: the least a per-layer
    recorder with the update ratio reads on a logged step, whatever its kernels."""
    twin.loss(twin.model).backward()
    tensors = []
    for param in twin.model.parameters():
        if param.grad is not None:
            tensors += [param.grad, param.detach(), twin.optimizer.state[param]["momentum_buffer"]]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tensor in tensors:
            torch.linalg.vector_norm(tensor)
        times.append(time.perf_counter() - start)
    twin.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=MODELS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per twin")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (the first logged step compiles)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.models:
        start = time.perf_counter()
        results[name] = measure(name, args.steps, args.warmup)
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(
        "| model | params | tensors | bare step (ms) | monitored step (ms) | whole-step ratio "
        "| in recorder (ms/step, mean / median) | every step: 1 + in recorder / bare | target | met "
        "| read floor (ms) | 1 + floor / bare |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = 1 + r["inside"] / r["bare"]
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['bare'] * 1e3:.1f} "
            f"| {r['monitored'] * 1e3:.1f} "
            f"| {r['monitored'] / r['bare']:.3f} | {r['inside'] * 1e3:.2f} / {r['inside_median'] * 1e3:.2f} "
            f"| {ratio:.3f}x | <= {TARGETS[name]} | {'yes' if ratio <= TARGETS[name] else 'no'} "
            f"| {r['floor'] * 1e3:.2f} | {1 + r['floor'] / r['bare']:.3f}x |"
        )
    print()
    for name, r in results.items():
        print(f"{name}: update-ratio kernel {r['kernel']}")


if __name__ == "__main__":
    main()
