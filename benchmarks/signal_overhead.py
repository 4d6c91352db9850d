"""What the backward-signal taps cost on a logged step: yolo11n forward + backward with and without them.

    python benchmarks/signal_overhead.py                 # yolo11n, 320 px, batch 8, CPU, 1 thread (~3 min)
    python benchmarks/signal_overhead.py --reps 5        # quicker, noisier

Builds an Ultralytics ``yolo11n.yaml`` DetectionModel (no download), and times, interleaved rep by rep with
the order alternating, the forward + backward of its real loss on random images: without taps, and with
:class:`gradlight.signal.BackwardSignalTaps` on the case study's blocks (``group_by=2`` on the
DetectionModel, i.e. ``model.0`` .. ``model.23``, one per YOLO stage; ``--blocks children`` taps every
child of ``model`` including the parameter-free ``Concat`` and ``Upsample``), including ``start``, ``stop``
and ``finalize``. It prints the median times, the extra milliseconds of a logged step, that extra as a share
of the backward pass (timed separately, without taps), and the ratio it gives at the default logging
interval of 50 steps (one logged step in 50). The time spent inside the taps' hooks (and in start, stop and
finalize) is timed too: on CPU hooks run synchronously, so it is their exact cost, without the drift of
whole-step differences. No tensor work happens on unlogged steps: no hook is
registered between logged steps (``tests/gradlight/test_signal.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch
from torch import nn

from gradlight.signal import BackwardSignalTaps

INTERVAL = 50  # the Trainer's default log_every_n_steps


class TimedTaps(BackwardSignalTaps):
    """The taps, with the time spent inside their hooks summed (on CPU hooks run synchronously).

    ``sink`` receives each hook's seconds; by default they add up in :attr:`inside`.
    """

    def __init__(self, *args: Any, sink: Callable[[float], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inside = 0.0
        self.sink = sink or self._add

    def _add(self, seconds: float) -> None:
        self.inside += seconds

    def _timing(self, hook: Any) -> Any:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args)
            finally:
                self.sink(time.perf_counter() - start)

        return timed

    def _make_enter(self, name: str) -> Any:
        return self._timing(super()._make_enter(name))

    def _make_exit(self, name: str) -> Any:
        return self._timing(super()._make_exit(name))

    def _make_reader(self, tap: Any) -> Any:
        return self._timing(super()._make_reader(tap))


def build(imgsz: int, batch: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """yolo11n from its YAML with Ultralytics' loss, and one batch of random images with 3 boxes each."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    model.train()
    generator = torch.Generator().manual_seed(0)
    boxes = 3 * batch
    data = {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=generator),
        "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([0.2 + 0.6 * torch.rand(boxes, 2), 0.1 + 0.2 * torch.rand(boxes, 2)], 1),
        "batch_idx": torch.arange(batch).repeat_interleave(3).float(),
    }
    return model, data


def step(model: nn.Module, data: dict[str, torch.Tensor], taps: TimedTaps | None) -> tuple[float, float, float]:
    """One forward + backward (and the taps' start/stop/finalize); returns (whole, backward, in taps) seconds."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if taps is not None:
        taps.inside = 0.0
        taps.start()
    installed = time.perf_counter()
    loss, _ = model.loss(data)
    middle = time.perf_counter()
    loss.sum().backward()
    finished = time.perf_counter()
    if taps is not None:
        taps.stop()
        taps.finalize(0)
    end = time.perf_counter()
    inside = 0.0 if taps is None else taps.inside + (installed - start) + (end - finished)
    return end - start, end - middle, inside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed steps per configuration (interleaved)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--blocks", choices=("layers", "children"), default="layers")
    args = parser.parse_args(argv)
    for name in ("reps", "imgsz", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    torch.set_num_threads(1)
    model, data = build(args.imgsz, args.batch)
    taps = TimedTaps(model, group_by=2) if args.blocks == "layers" else TimedTaps(model, blocks=["model.*"])
    times: dict[str, list[float]] = {"off": [], "on": []}
    backward: list[float] = []
    inside: list[float] = []
    for rep in range(args.warmup + args.reps):
        order = ("off", "on") if rep % 2 == 0 else ("on", "off")
        for config in order:
            whole, back, in_taps = step(model, data, taps if config == "on" else None)
            if rep >= args.warmup:
                times[config].append(whole)
                if config == "off":
                    backward.append(back)
                else:
                    inside.append(in_taps)
    stats = taps.finalize(0)
    assert stats is None or not taps.active
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    back = statistics.median(backward)
    extra = on - off
    # Only the pairwise differences of the interleaved reps carry the drift equally; report their median too.
    paired = statistics.median(b - a for a, b in zip(times["off"], times["on"]))
    print(
        f"yolo11n.yaml, {args.imgsz} px, batch {args.batch}, CPU, torch threads {torch.get_num_threads()}, "
        f"{args.reps} interleaved reps, {len(taps.blocks)} tapped blocks ({args.blocks})\n"
    )
    hooks = statistics.median(inside)
    print("| measure | value |\n|---|---|")
    print(f"| forward + backward, no taps (median ms) | {1e3 * off:.1f} |")
    print(f"| forward + backward, taps on, incl. finalize (median ms) | {1e3 * on:.1f} |")
    print(f"| backward pass alone, no taps (median ms) | {1e3 * back:.1f} |")
    print(f"| extra per logged step, difference of medians (ms) | {1e3 * extra:.2f} |")
    print(f"| extra per logged step, median of paired differences (ms) | {1e3 * paired:.2f} |")
    print(f"| extra per logged step, inside the taps' hooks + start/stop/finalize (median ms) | {1e3 * hooks:.2f} |")
    print(f"| in-hook extra as a share of the backward pass | {hooks / back:.1%} |")
    ratio = 1 + hooks / (INTERVAL * off)
    print(f"| default interval ({INTERVAL} steps), forward + backward ratio (in-hook) | {ratio:.4f}x |")
    print(
        "\n(whole-step differences carry the machine's drift; the in-hook time is the taps' own work, timed where"
        " all of it runs)"
    )


if __name__ == "__main__":
    main()
