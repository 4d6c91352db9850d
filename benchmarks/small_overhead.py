"""Every-step logging on small models, against a bare twin in the same process: where fixed costs dominate.

    python benchmarks/small_overhead.py                        # resnet18 at 32 px (about 2 min on a busy CPU)
    python benchmarks/small_overhead.py --models resnet18 yolo11n --steps 10
    python benchmarks/small_overhead.py --clock cpu            # the thread's CPU time (a machine other jobs share)

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
reports per-layer gradient, parameter and update norms must read on a logged step), over the bare step. The
floor is timed on every timed step, right after the monitored twin's step, on that step's own tensors, so that
it sees the same load as the steps it is compared with.

``--variants`` adds monitored twins that differ in their kernels, stepped in turn with the others (same
weights, same batches): ``default`` (what ships), ``two_pass`` (the default with the gradient statistics taken
in two eager passes, as before the one-pass kernel) and ``eager`` (``update_kernel="eager"``: no compiled
kernel at all). Each gets its own row. The machine's load average is printed before and after: on a shared
machine read the ratios, not the milliseconds.

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

from gradlight.compiled import GradientKernel
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


#: The clocks ``--clock`` names: wall time, or the CPU time of the timing thread. On a machine other jobs share,
#: the thread's CPU time leaves out the time another process held its core (one thread: ``OMP_NUM_THREADS=1``
#: keeps every kernel, compiled ones included, on it).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
clock: Callable[[], float] = time.perf_counter
VARIANTS = ("default", "two_pass", "eager")


def recorder_for(model: nn.Module, save_dir: str, variant: str) -> GradientFlowRecorder:
    """The monitored twin's recorder: every step logged, diagnosis on, history written (see :data:`VARIANTS`)."""
    kernel = "eager" if variant == "eager" else "auto"
    recorder = GradientFlowRecorder(model, save_dir, log_every_n_steps=1, update_kernel=kernel)
    if variant == "two_pass":
        recorder.tracker.gradient_kernel = GradientKernel("eager")
    return recorder


class Twin:
    """One copy of the model with its optimizer and, if monitored, its recorder; times its steps."""

    def __init__(
        self, model: nn.Module, loss: Callable[[nn.Module], Tensor], save_dir: str | None, variant: str = "default"
    ) -> None:
        self.model, self.loss = model, loss
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.recorder = None if save_dir is None else recorder_for(model, save_dir, variant)
        self.variant = variant
        self.steps: list[float] = []
        self.inside: list[float] = []
        self.floor: list[float] = []
        self.count = 0

    def step(self, timed: bool) -> None:
        start = clock()
        loss = self.loss(self.model)
        loss.backward()
        inside = 0.0
        if self.recorder is not None:
            mark = clock()
            self.recorder.capture(self.count, self.optimizer)
            inside += clock() - mark
        self.optimizer.step()
        if self.recorder is not None:
            mark = clock()
            self.recorder.end_step(loss)
            inside += clock() - mark
        elapsed = clock() - start
        if timed and self.recorder is not None:
            self.floor.append(read_floor(self))  # outside the step's time: this step's own tensors
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        if timed:
            self.steps.append(elapsed)
            self.inside.append(inside)


def measure(name: str, steps: int, warmup: int, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Each monitored variant and the bare twin, one step each in turn (rotated), on the same batches."""
    model, loss = build(name)
    with tempfile.TemporaryDirectory() as save_dir:
        bare = Twin(copy.deepcopy(model), loss, None)
        monitored = [Twin(copy.deepcopy(model), loss, os.path.join(save_dir, v), v) for v in variants]
        twins = [bare, *monitored]
        for i in range(warmup + steps):
            shift = i % len(twins)
            for side in twins[shift:] + twins[:shift]:
                side.step(timed=i >= warmup)
        results = {}
        for twin in monitored:
            assert twin.recorder is not None
            twin.recorder.close()
            updates = twin.recorder.tracker.updates
            results[twin.variant] = {
                "bare": statistics.mean(bare.steps),
                "bare_median": statistics.median(bare.steps),
                "monitored": statistics.mean(twin.steps),
                "inside": statistics.mean(twin.inside),
                "inside_median": statistics.median(twin.inside),
                "floor": statistics.median(twin.floor),
                "params": sum(p.numel() for p in model.parameters()),
                "tensors": sum(1 for _ in model.parameters()),
                "kernel": (updates.kernel_info if updates is not None else None) or "",
            }
    return results


def read_floor(twin: Twin) -> float:
    """Time of one norm over each gradient, parameter and momentum buffer of ``twin`` as they are now: the
    least a per-layer recorder with the update ratio reads on a logged step, whatever its kernels."""
    tensors = []
    for param in twin.model.parameters():
        if param.grad is not None:
            tensors += [param.grad, param.detach(), twin.optimizer.state[param]["momentum_buffer"]]
    start = clock()
    for tensor in tensors:
        torch.linalg.vector_norm(tensor)
    return clock() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=MODELS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per twin")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (the first logged step compiles)")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS, help="monitored twins")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or the thread's CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    global clock
    clock = CLOCKS[args.clock]
    print(f"clock: {args.clock}", flush=True)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results = {}
    for name in args.models:
        start = time.perf_counter()
        results[name] = measure(name, args.steps, args.warmup, list(dict.fromkeys(args.variants)))
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_table(results)


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """One row per model and monitored variant; the target is judged on the mean in-recorder time."""
    print()
    print(
        "| model | variant | params | tensors | bare step (ms) | monitored step (ms) | whole-step ratio "
        "| in recorder (ms/step, mean / median) | every step: 1 + in recorder / bare | target | met "
        "| read floor (ms, median) | 1 + floor / bare | in recorder / floor (medians) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for variant, r in rows.items():
            ratio = 1 + r["inside"] / r["bare"]
            print(
                f"| {name} | {variant} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['bare'] * 1e3:.1f} "
                f"| {r['monitored'] * 1e3:.1f} "
                f"| {r['monitored'] / r['bare']:.3f} | {r['inside'] * 1e3:.2f} / {r['inside_median'] * 1e3:.2f} "
                f"| {ratio:.3f}x | <= {TARGETS[name]} | {'yes' if ratio <= TARGETS[name] else 'no'} "
                f"| {r['floor'] * 1e3:.2f} | {1 + r['floor'] / r['bare_median']:.3f}x "
                f"| {r['inside_median'] / r['floor']:.2f} |"
            )
    print()
    for name, rows in results.items():
        for variant, r in rows.items():
            print(f"{name} ({variant}): update-ratio kernel {r['kernel']}")


if __name__ == "__main__":
    main()
