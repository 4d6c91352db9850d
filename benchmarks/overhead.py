"""What the monitor costs: step time of a real detector, side by side, in one run.

    python benchmarks/overhead.py                       # yolo11n, 320 px, batch 8, CPU, 1 thread (~23 min)
    python benchmarks/overhead.py --rounds 1 --steps 12 # quicker, noisier (no logged default-interval step)

Trains an Ultralytics ``yolo11n.yaml`` DetectionModel (built from YAML, no download) with its real loss on
random images in Lightning, in four configurations interleaved round by round so that drift hits them
equally:

- ``none``: no monitor;
- ``every_step``: ``GradientFlowMonitor(log_every_n_steps=1)``;
- ``default``: ``GradientFlowMonitor()`` at the Trainer's default interval (50 steps);
- ``default_taps``: the same, plus :class:`gradlight.signal.BackwardSignalTaps` on the same logged steps
  (``group_by=3`` on the LightningModule: one block per YOLO stage, the case study's layers), started before
  the logged step's forward and finalized before its optimizer step; its hooks' time (module and tensor
  hooks, ``finalize``) counts as in-monitor time;
- ``lightning_recipe``: Lightning's documented recipe as written, ``grad_norm`` + ``self.log_dict`` in
  ``on_before_optimizer_step`` every step: per-tensor gradient L2 norms and their total only, CSVLogger;
- ``lightning_recipe_same_stats``: the same recipe extended to the statistics the monitor records, per
  parameter: ``grad_norm``, plus each gradient's largest absolute value and NaN/Inf count and each
  parameter's L2 norm in ``on_before_optimizer_step``, and the update ratio (L2 of the parameter change over
  the parameter's L2 before it) in ``on_train_batch_end``, all through ``self.log_dict``.

It prints the mean step time of each (with its standard error), its ratio to ``none``, the added time per
step, and the time spent inside the monitor's hooks, where all of its work runs. Step time is measured from
one ``on_train_batch_start`` to the next, so logging done at the end of a batch counts. Each run is 3 warm-up
steps plus 50 timed ones, so the default interval's timed window holds exactly one logged step (step 50): its
mean is the amortised cost. The targets table compares the in-hook time with the mean step without a
monitor, and with the Lightning recipe's added step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from torch.utils.data import DataLoader

from gradlight import GradientFlowMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when imported by path
from signal_overhead import TimedTaps

CONFIGS = ("none", "every_step", "default", "default_taps", "lightning_recipe", "lightning_recipe_same_stats")
RECIPES = ("lightning_recipe", "lightning_recipe_same_stats")


def random_batches(count: int, batch: int, imgsz: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Detection batches in Ultralytics' format: float images, 3 boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        boxes = 3 * batch
        centers = 0.2 + 0.6 * torch.rand(boxes, 2, generator=generator)
        sizes = 0.1 + 0.2 * torch.rand(boxes, 2, generator=generator)
        batches.append(
            {
                "img": torch.rand(batch, 3, imgsz, imgsz, generator=generator),
                "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float(),
                "bboxes": torch.cat([centers, sizes], 1),
                "batch_idx": torch.arange(batch).repeat_interleave(3).float(),
            }
        )
    return batches


class Detector(L.LightningModule):
    """yolo11n trained with Ultralytics' loss; optionally with one of the Lightning recipes (see ``RECIPES``)."""

    def __init__(self, recipe: str | None = None) -> None:
        super().__init__()
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils import DEFAULT_CFG

        torch.manual_seed(0)
        self.model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
        self.model.args = get_cfg(DEFAULT_CFG)
        self.recipe = recipe
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (parameter copy, its L2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model.loss(batch)
        return loss.sum()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # The documented recipe: https://lightning.ai/docs/pytorch/stable/debug/debugging_intermediate.html
        if self.recipe == "lightning_recipe":
            self.log_dict(grad_norm(self, norm_type=2))
        elif self.recipe == "lightning_recipe_same_stats":
            stats = grad_norm(self, norm_type=2)
            for name, param in self.named_parameters():
                if param.grad is None:
                    continue
                grad, weight = param.grad.detach(), param.detach()
                stats[f"grad_max_abs/{name}"] = grad.abs().max()
                stats[f"grad_nonfinite/{name}"] = (~torch.isfinite(grad)).sum().float()
                stats[f"param_l2/{name}"] = weight.norm()
                self._before[name] = (weight.clone(), stats[f"param_l2/{name}"])
            self.log_dict(stats)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.recipe == "lightning_recipe_same_stats":
            parameters = dict(self.named_parameters())
            ratios = {
                f"update_ratio/{name}": (parameters[name].detach() - before).norm() / norm
                for name, (before, norm) in self._before.items()
            }
            self._before.clear()
            self.log_dict(ratios)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class TimedMonitor(GradientFlowMonitor):
    """The monitor, with the time spent inside its own hooks summed per batch (its exact added cost)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inside: list[float] = []

    def _timed(self, method: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.inside[-1] += time.perf_counter() - start

    def on_train_batch_start(self, *args: Any) -> None:
        self.inside.append(0.0)
        self._timed(super().on_train_batch_start, *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._timed(super().on_before_optimizer_step, *args)

    def setup(self, *args: Any) -> None:
        super().setup(*args)
        if self.recorder is not None:  # the recorder's optimizer post-step hook (installed by `watch`) finishes steps
            hook = self.recorder._after_optimizer_step
            self.recorder._after_optimizer_step = lambda *hook_args: self._timed(hook, *hook_args)  # type: ignore[method-assign]

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed(super().on_train_batch_end, *args)


class SignalTapsCallback(L.Callback):
    """Runs the taps on the monitor's logged steps: start before the forward, finalize before the step.

    The taps' hooks add their time to the monitor's in-hook time of the step.
    """

    def __init__(self, monitor: TimedMonitor) -> None:
        self.monitor = monitor
        self.taps: TimedTaps | None = None

    def _add_to_monitor(self, seconds: float) -> None:
        self.monitor.inside[-1] += seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.taps is None:
            self.taps = TimedTaps(pl_module, group_by=3, sink=self._add_to_monitor)
        if self.monitor.recorder is not None and self.monitor.recorder.is_logged_step(trainer.global_step):
            self.taps.start()  # the monitor's on_train_batch_start ran first: inside[-1] is this step's

    def on_before_optimizer_step(self, *args: Any) -> None:
        if self.taps is not None and self.taps.active:
            start = time.perf_counter()
            self.taps.stop()
            self.taps.finalize(0)
            self.monitor.inside[-1] += time.perf_counter() - start


class StepTimer(L.Callback):
    """Time between consecutive batch starts (includes the optimizer step and end-of-batch logging)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def run(
    config: str, batches: list[dict[str, torch.Tensor]], workdir: Path, warmup: int
) -> tuple[list[float], list[float]]:
    """Train one configuration; return its timed step durations and the monitor's in-hook time per step."""
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    monitor = None
    if config == "every_step":
        monitor = TimedMonitor(log_every_n_steps=1, save_dir=workdir / "gl")
    elif config in ("default", "default_taps"):
        monitor = TimedMonitor(save_dir=workdir / "gl")
    if monitor is not None:
        callbacks.append(monitor)
    if monitor is not None and config == "default_taps":
        callbacks.append(SignalTapsCallback(monitor))
    logger = CSVLogger(workdir / "csv")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1 if config in RECIPES else 50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Detector(recipe=config if config in RECIPES else None), DataLoader(batches, batch_size=None))
    inside = monitor.inside[warmup + 1 :] if monitor is not None else []
    return timer.times[warmup:], inside


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds",
        type=int,
        default=len(CONFIGS),
        help="interleaved rounds of every configuration, order rotated per round (default: one per position)",
    )
    parser.add_argument(
        "--steps", type=int, default=53, help="optimizer steps per configuration and round (53 = 3 warm-up + 50)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps discarded at the start of each run")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "imgsz", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--warmup must be in [0, --steps - 1), got {args.warmup} with --steps {args.steps}")
    torch.set_num_threads(1)
    batches = random_batches(args.steps, args.batch, args.imgsz)
    times: dict[str, list[float]] = {config: [] for config in CONFIGS}
    inside: dict[str, list[float]] = {config: [] for config in CONFIGS}  # per timed step
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            # Rotate the order every round (with one round per configuration each runs once in each position), so
            # that drift between runs, e.g. a slower first run, does not favour any configuration.
            shift = round_index % len(CONFIGS)
            for config in CONFIGS[shift:] + CONFIGS[:shift]:
                measured, in_hooks = run(config, batches, Path(tmp) / f"{config}{round_index}", args.warmup)
                times[config] += measured
                inside[config] += in_hooks
                print(f"round {round_index + 1}/{args.rounds} {config:>16}: done", file=sys.stderr)
    timed_steps = range(args.warmup + 1, args.steps)  # a step is timed from its start to the next one's
    logged_default = sum(1 for step in timed_steps if step % 50 == 0)
    base, base_error = mean_and_error(times["none"])
    base_median = statistics.median(times["none"])
    print(
        f"\nyolo11n.yaml, {args.imgsz} px, batch {args.batch}, CPU, torch threads {torch.get_num_threads()}, "
        f"{len(times['none'])} timed steps per configuration in {args.rounds} interleaved rounds; the default "
        f"interval (50) logs {logged_default} of every {len(timed_steps)} timed steps\n"
    )
    print(
        "| configuration | mean step (ms) | added, mean (ms) | median step (ms) | ratio of medians | "
        "in monitor hooks (ms/step) |"
    )
    print("|---|---|---|---|---|---|")
    added: dict[str, float] = {}
    for config in CONFIGS:
        mean, error = mean_and_error(times[config])
        median = statistics.median(times[config])
        added[config] = median - base_median
        hooks = f"{1e3 * statistics.fmean(inside[config]):.2f}" if inside[config] else "-"
        spread = (error**2 + base_error**2) ** 0.5
        print(
            f"| {config} | {1e3 * mean:.1f} ± {1e3 * error:.1f} | {1e3 * (mean - base):+.1f} ± {1e3 * spread:.1f} | "
            f"{1e3 * median:.1f} | {median / base_median:.4f} | {hooks} |"
        )
    every = statistics.fmean(inside["every_step"])
    default = statistics.fmean(inside["default"])
    taps = statistics.fmean(inside["default_taps"])
    recipe, same_stats = added["lightning_recipe"], added["lightning_recipe_same_stats"]
    print(
        "\nadded, mean = difference of mean step times (± standard error); the medians ignore the default"
        " interval's one logged step; in-hook time = the monitor's own work, timed inside its hooks (everything"
        " it does runs there)."
    )
    print("\n| target | measured | met |\n|---|---|---|")
    rows = [
        ("every step <= 1.02x", (base + every) / base, (base + every) / base <= 1.02),
        ("default interval <= 1.005x", (base + default) / base, (base + default) / base <= 1.005),
        ("default interval, signal taps on, <= 1.005x", (base + taps) / base, (base + taps) / base <= 1.005),
        (
            "added time >= 10x below the Lightning recipe's for the same statistics",
            same_stats / every,
            same_stats / every >= 10,
        ),
    ]
    for name, value, met in rows:
        print(f"| {name} | {value:.4f} | {'yes' if met else 'no'} |")
    print(f"| (no target) added time below the recipe as written, gradient norms only | {recipe / every:.4f} | - |")
    if logged_default:  # the taps' in-hook time beyond the monitor's, per logged step
        extra = (taps - default) * len(timed_steps) / logged_default
        print(f"| (no target) signal taps, extra ms per logged step (default interval) | {1e3 * extra:.2f} | - |")
    print(
        "\n(ratios from in-hook times over the mean step without a monitor; the recipes' added times are"
        " differences of median step times)"
    )


if __name__ == "__main__":
    main()
