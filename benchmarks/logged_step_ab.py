"""A/B timing of the tracker's logged step at two commits, interleaved in one process.

A logged step is ``tracker.capture`` + ``optimizer.step()`` + ``tracker.finalize``: what the monitor adds to
a step it records, plus the optimizer step between the two calls (the update ratio's copy and difference
straddle it). The baseline is the ``gradlight`` package of ``--baseline`` (``git archive``), imported under
another name next to the working tree's, so that both run on the same model, gradients and machine state.

The model (``--model``) is Ultralytics' ``yolo11n.yaml`` DetectionModel (built from YAML, no download) with its real
loss on random 320 px images, batch 8, SGD with momentum (the default); a GPT-2 of ``benchmarks/scale.py``
(``gpt2-1m``, ``gpt2-7m``: its AdamW, batch 4 x 64 tokens); or torchvision's resnet18 of
``benchmarks/small_overhead.py`` (32 px, batch 16, SGD with momentum and weight decay). One thread. Each round takes
fresh gradients (one forward and backward, not timed), then times ``--repeats`` logged steps of each version,
alternating, the first version swapped every round. Besides the medians over all steps it reports the median of the
per-round ratios, which pairs steps taken at the same moment and so cancels most of the drift of a shared machine.
Before timing, both versions record the same step from the same state: the script reports whether their records are
bitwise equal and how many aten operators each dispatched for it (optimizer step included), a count that does not
depend on the machine's load.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/logged_step_ab.py --baseline HEAD~1
    OMP_NUM_THREADS=1 python benchmarks/logged_step_ab.py --baseline HEAD~3 --model gpt2-1m --clock cpu

``--clock cpu`` times with the thread's CPU time instead of the wall clock: on a machine other jobs share, it
leaves out the time another process held the core.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

BASELINE_PACKAGE = "gradlight_baseline"


def import_baseline(revision: str, folder: Path) -> ModuleType:
    """``gradlight`` as of ``revision``, importable as :data:`BASELINE_PACKAGE` (imports rewritten)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "gradlight"], cwd=root, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / BASELINE_PACKAGE
    (folder / "gradlight").rename(package)
    pattern = re.compile(r"\bgradlight\.(?=[a-z_])|(?<=from )gradlight\b(?= import)|(?<=import )gradlight\b")
    for source in package.rglob("*.py"):
        source.write_text(pattern.sub(lambda m: m.group(0).replace("gradlight", BASELINE_PACKAGE), source.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{BASELINE_PACKAGE}.tracker")


MODELS = ("yolo11n", "gpt2-1m", "gpt2-7m", "resnet18")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def make(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """The model ``name``, its optimizer, and one backward pass on its fixed batch (gradients zeroed first)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if name.startswith("gpt2"):
        import scale

        model, optimizer, tokens = scale.build(name)
        loss: Callable[[], torch.Tensor] = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
    elif name == "resnet18":
        import small_overhead

        model, of = small_overhead.build(name)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        loss = lambda: of(model)  # noqa: E731
    else:
        model, data = make_model()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        loss = lambda: model.loss(data)[0].sum()  # noqa: E731

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()

    return model, optimizer, backward


def make_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """yolo11n from YAML with Ultralytics' loss arguments, and one random 320 px batch of 8 images."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    generator = torch.Generator().manual_seed(0)
    batch, boxes = 8, 24
    data = {
        "img": torch.rand(batch, 3, 320, 320, generator=generator),
        "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([0.2 + 0.6 * torch.rand(boxes, 2), 0.1 + 0.2 * torch.rand(boxes, 2)], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(3).float(),
    }
    return model, data


def logged_step(tracker: Any, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], step: int) -> Any:
    tracker.capture(step, params, owner=optimizer)
    optimizer.step()
    return tracker.finalize()


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active: a load-independent measure of a step's work."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def records_equal(left: Any, right: Any) -> bool:
    """Same layers, bitwise the same per-layer metrics and global metrics (NaN equal to NaN)."""
    if left.layers != right.layers or set(left.metrics) != set(right.metrics):
        return False
    same = all(np.array_equal(left.metrics[m], right.metrics[m], equal_nan=True) for m in left.metrics)
    return same and all(
        np.array_equal(left.global_metrics[k], right.global_metrics[k], equal_nan=True) for k in left.global_metrics
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD~1", help="git revision of the baseline (default HEAD~1)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds, each with fresh gradients")
    parser.add_argument("--repeats", type=int, default=5, help="logged steps of each version per round")
    parser.add_argument("--model", choices=MODELS, default="yolo11n", help="the model and its optimizer")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time or the thread's CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCKS[args.clock]
    load = os.getloadavg()

    from gradlight.tracker import GradientFlowTracker

    with tempfile.TemporaryDirectory() as folder:
        baseline = import_baseline(args.baseline, Path(folder))
        model, optimizer, backward = make(args.model)
        params = [p for p in model.parameters() if p.requires_grad]
        versions = {"baseline": baseline.GradientFlowTracker(model), "working tree": GradientFlowTracker(model)}
        backward()
        optimizer.step()  # the optimizer's state exists before the state is saved below
        backward()
        state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        records, operators = {}, {}
        for name, tracker in versions.items():  # the same step from the same state
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
            with OperatorCount() as counter:
                records[name] = logged_step(tracker, optimizer, params, 0)
            operators[name] = counter.count
        equal = records_equal(records["baseline"], records["working tree"])

        times: dict[str, list[float]] = {name: [] for name in versions}
        paired: list[float] = []  # per round: median working-tree step over median baseline step
        order = list(versions)
        for round_ in range(args.rounds):
            backward()
            gc.collect()
            this_round: dict[str, list[float]] = {name: [] for name in versions}
            for _ in range(args.repeats):
                for name in order:
                    start = clock()
                    logged_step(versions[name], optimizer, params, round_)
                    this_round[name].append(clock() - start)
            for name, values in this_round.items():
                times[name].extend(values)
            paired.append(statistics.median(this_round["working tree"]) / statistics.median(this_round["baseline"]))
            order.reverse()

    tensors = len(params)
    print(
        f"{args.model}, {tensors} trainable tensors, {type(optimizer).__name__}, {torch.get_num_threads()} thread; "
        f"{args.rounds} rounds x {args.repeats} logged steps per version; clock: {args.clock}"
    )
    print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
    print(f"baseline: {args.baseline}; records of the same step bitwise equal: {equal}")
    print(f"{'version':<14}{'median ms':>11}{'mean ms':>10}{'aten ops':>10}")
    for name, values in times.items():
        median, mean = statistics.median(values) * 1e3, statistics.mean(values) * 1e3
        print(f"{name:<14}{median:>11.2f}{mean:>10.2f}{operators[name]:>10}")
    ratio = statistics.median(times["working tree"]) / statistics.median(times["baseline"])
    print(f"ratio of the medians, working tree / baseline: {ratio:.4f}")
    low, middle, high = np.percentile(paired, [25, 50, 75])
    print(f"per-round ratio (same gradients, same moment): median {middle:.4f}, quartiles {low:.4f}-{high:.4f}")


if __name__ == "__main__":
    main()
