"""The training-diagnosis libraries a user could install instead of gradlight, side by side on the same runs.

    OMP_NUM_THREADS=1 python -m benchmarks.competitors                 # every library, every run
    OMP_NUM_THREADS=1 python -m benchmarks.competitors --library torchdiag --library gradlight --json out.json

Each library (``pip install gradlight[competitors]`` installs ``torchmortem``, ``torchdiag``, ``neuraldbg``
and ``neural-observatory``; they are benchmark-only, never gradlight dependencies) is attached the way its own
README says (:data:`ADAPTERS`) to the same plain PyTorch loop (:func:`benchmarks.buggy.runner.train`) on the
same runs (:data:`RUNS`: a subset of the diagnosis zoo and of the ported buggy programs). Every library runs
in its own process (``--worker``); one that is not installed, crashes or hangs is a row, not the end of the
benchmark. Per library the table shows:

* healthy runs without an alarm (an alarm: whatever the library reports as a warning or worse);
* broken runs with an alarm, and with an alarm naming the faulty layer (or any alarm, where the fault has
  no single layer);
* runs that crashed (inside the library or because of it);
* the every-step overhead: the median step with the library attached over the median step of a bare twin of
  the same run (same process, built the same way, trained just before).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor, nn

from benchmarks.buggy.runner import Alarm, Bare, Observer, Setup, matches, train

__all__ = ["ADAPTERS", "RUNS", "LibraryRow", "main", "render", "run_library", "summarise"]

_ZOO_STEPS = 12  # zoo runs are cut to this many steps here (each is trained twice per library)


# ------------------------------------------------------------------------------------------------ adapters
def _layer(name: str) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class TorchMortem:
    """torchmortem (README): ``Autopsy(model, optimizer=...)``, ``autopsy.step(loss=loss.item())`` after each
    step, ``autopsy.report(path)``; alarms: findings of severity WARNING or CRITICAL (one per affected layer)."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torchmortem import Autopsy

        self.autopsy = Autopsy(model, optimizer=optimizer)
        self.autopsy.attach()

    def start_step(self, step: int) -> None:
        return None

    def after_backward(self, step: int, loss: Tensor) -> None:
        return None

    def end_step(self, step: int, loss: Tensor) -> None:
        self.autopsy.step(loss=loss.item())

    def finish(self) -> list[Alarm]:
        self.autopsy.detach()
        with tempfile.TemporaryDirectory() as folder:
            report = self.autopsy.report(Path(folder) / "autopsy.json")
        alarms = []
        for finding in report.findings:
            if finding.severity.name not in ("WARNING", "CRITICAL"):
                continue
            for layer in finding.affected_layers or [""]:
                alarms.append(Alarm(finding.category, _layer(str(layer)), int(finding.step_range[0])))
        return alarms


class TorchDiag:
    """torchdiag (README): ``check_gradients(model)`` after every ``loss.backward()``, ``check_dead_neurons(model,
    x)`` on a batch (here after training); alarms: EXPLODE / VANISH / NO GRAD rows and dead-neuron WARNING /
    CRITICAL rows (its printed tables are discarded)."""

    def __init__(self) -> None:
        self.alarms: dict[tuple[str, str], Alarm] = {}
        self.sample: Any = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model

    def start_step(self, step: int) -> None:
        return None

    def after_backward(self, step: int, loss: Tensor) -> None:
        import torchdiag

        with contextlib.redirect_stdout(io.StringIO()):
            stats = torchdiag.check_gradients(self.model)
        for name, row in stats.items():
            status = str(row.get("status", "OK"))
            if status != "OK":
                self.alarms.setdefault((status, _layer(name)), Alarm(status.lower(), _layer(name), step))

    def end_step(self, step: int, loss: Tensor) -> None:
        return None

    def finish(self) -> list[Alarm]:
        import torchdiag

        if isinstance(self.sample, Tensor):
            with contextlib.redirect_stdout(io.StringIO()):
                dead = torchdiag.check_dead_neurons(self.model, self.sample)
            for name, row in dead.items():
                if row.get("dead_pct", 0.0) > 20:
                    self.alarms.setdefault(("dead", name), Alarm("dead_neurons", name, None))
        return list(self.alarms.values())


class NeuralDbgAdapter:
    """neuraldbg (README): ``with NeuralDbg(model) as dbg:`` around the loop, ``dbg.record_loss(loss.item())``
    after backward; alarms: its semantic events that move into a non-healthy state."""

    _HEALTHY = ("healthy", "normal", "stable")

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from neuraldbg import NeuralDbg

        self.dbg = NeuralDbg(model)
        self.dbg.__enter__()
        # it names a module "<class>_<name>" ("Linear_dense0"; the model itself "root"): back to the module name
        self.names = {f"{type(m).__name__}_{name}": name for name, m in model.named_modules() if name}

    def start_step(self, step: int) -> None:
        return None

    def after_backward(self, step: int, loss: Tensor) -> None:
        self.dbg.record_loss(loss.item())

    def end_step(self, step: int, loss: Tensor) -> None:
        return None

    def finish(self) -> list[Alarm]:
        self.dbg.__exit__(None, None, None)
        alarms = []
        for event in self.dbg.get_events():
            state = getattr(event.to_state, "value", event.to_state)
            if str(state) not in self._HEALTHY:
                layer = self.names.get(event.layer_name, "" if event.layer_name == "root" else event.layer_name)
                alarms.append(Alarm(f"{event.event_type.value}:{state}", layer, event.step))
        return alarms


class NeuralObservatory:
    """neural-observatory (README): ``Observatory(model).watch()``, ``obs.step(step=..., epoch=...)`` before each
    forward pass, ``obs.stop()``, ``obs.report()``; alarms: the report's WARNING / CRITICAL results."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from neural_observatory import Observatory

        self.obs = Observatory(model)
        self.obs.watch()

    def start_step(self, step: int) -> None:
        self.obs.step(step=step, epoch=0)

    def after_backward(self, step: int, loss: Tensor) -> None:
        return None

    def end_step(self, step: int, loss: Tensor) -> None:
        return None

    def finish(self) -> list[Alarm]:
        self.obs.stop()
        report = self.obs.report()
        return [Alarm(r.analyzer_name, _layer(str(r.layer_name)), int(r.step)) for r in report.warnings()]


#: Library name -> ``"module:factory"`` of its adapter (an :class:`~benchmarks.buggy.runner.Observer`).
ADAPTERS: dict[str, str] = {
    "gradlight": "benchmarks.buggy.runner:GradlightObserver",
    "torchmortem": "benchmarks.competitors:TorchMortem",
    "torchdiag": "benchmarks.competitors:TorchDiag",
    "neuraldbg": "benchmarks.competitors:NeuralDbgAdapter",
    "neural-observatory": "benchmarks.competitors:NeuralObservatory",
}


def _load(spec: str) -> Callable[[], Observer]:
    module, _, attr = spec.partition(":")
    factory: Callable[[], Observer] = getattr(importlib.import_module(module), attr)
    return factory


# ------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    """One run of the comparison: where it comes from, whether it is healthy, its faulty layers."""

    name: str
    healthy: bool
    layers: tuple[str, ...]


#: Zoo runs (``benchmarks/zoo/catalog.py``, cut to 12 steps) and ported programs (``benchmarks/buggy``): 6 healthy
#: (one a ResNet whose residual branches start at zero), 8 broken (a sigmoid VGG and 12 sigmoid layers: vanishing; a
#: NaN injected and exponential activations: non-finite; dead ReLUs; a layer group at lr 0; a layer cut off the
#: loss; a one-unit softmax), small enough to train 2 x 6 times on a shared CPU.
RUNS: tuple[str, ...] = (
    "zoo:tv_resnet18",
    "zoo:tv_resnet18_zero_init_residual",
    "zoo:broken_vgg11_sigmoid",
    "zoo:broken_resnet18_nan_at_10",
    "zoo:broken_vgg11_bn_dead_relu",
    "zoo:broken_resnet18_lr0_layer3",
    "zoo:broken_resnet18_detached_layer2",
    "buggy:AUTOTRAINER/circle/simplednn/correct",
    "buggy:AUTOTRAINER/circle/model_0ae2cd88",
    "buggy:AUTOTRAINER/circle/model_5ab0aeda",
    "buggy:AUTOTRAINER/blob/linear_out/correct",
    "buggy:TheDeepChecker/regrNN/correct",
    "buggy:DeepLocalize/45337371/correct",
    "buggy:DeepLocalize/45337371",
)


def _zoo_setup(name: str) -> tuple[Run, Setup]:
    """A zoo run as a plain loop: the zoo's model, faults, batches, loss and optimizer; steps cut to 12."""
    zoo_dir = str(Path(__file__).resolve().parent)
    if zoo_dir not in sys.path:
        sys.path.insert(0, zoo_dir)  # the zoo imports itself as the top-level package ``zoo``
    from zoo.catalog import CATALOG
    from zoo.faults import Clock
    from zoo.runner import _build
    from zoo.scoring import FIRST_LAYER

    entry = next(r for r in CATALOG if r.name == name)
    clock = Clock()
    model, batches = _build(entry, clock)
    optim = entry.regime.optim
    groups = optim.parameter_groups(list(model.named_parameters()))
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
        if optim.name == "sgd"
        else torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    )
    first = next(n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)))
    layers = tuple(first if p == FIRST_LAYER else p for p in entry.expect.layers)
    steps = min(entry.regime.steps, _ZOO_STEPS)

    def on_step(step: int) -> None:
        clock.step = step

    setup = Setup(model, optimizer, batches, entry.task.loss, steps, on_step=on_step)
    return Run(f"zoo/{name}", entry.expect.healthy, layers), setup


def build_run(spec: str) -> tuple[Run, Setup]:
    """``"zoo:<name>"`` or ``"buggy:<program name>"`` -> the run and a freshly built setup."""
    source, _, name = spec.partition(":")
    if source == "zoo":
        return _zoo_setup(name)
    if source == "buggy":
        from benchmarks.buggy.programs import PROGRAMS

        program = next(p for p in PROGRAMS if p.name == name)
        return Run(name, program.healthy, program.layers), program.build()
    raise ValueError(f"run {spec!r} must start with 'zoo:' or 'buggy:'.")


# ------------------------------------------------------------------------------------------------ one library
@dataclass
class RunRow:
    """One library on one run."""

    run: str
    healthy: bool
    alarms: list[str] = field(default_factory=list)
    found: bool = False
    placed: bool = False
    error: str | None = None
    bare_ms: float = math.nan
    library_ms: float = math.nan


def run_library(adapter: str, runs: tuple[str, ...]) -> list[RunRow]:
    """Train every run twice in this process: bare, then with the library's observer; judge its alarms."""
    rows = []
    for spec in runs:
        run, setup = build_run(spec)
        bare = train(setup, Bare())
        run, setup = build_run(spec)
        try:
            observer = _load(adapter)()
        except Exception as error:  # the library does not import: every run is a crash
            rows.append(RunRow(run.name, run.healthy, error=f"{type(error).__name__}: {error}"))
            continue
        if hasattr(observer, "sample"):
            first = setup.batches[0]
            observer.sample = first[0] if isinstance(first, (tuple, list)) else None
        result = train(setup, observer)
        warnings_ = [a for a in result.alarms if a.severity == "warning"]
        placed = any(matches(a.layer, run.layers) for a in warnings_) if run.layers else False
        rows.append(
            RunRow(
                run.name,
                run.healthy,
                alarms=sorted({f"{a.kind}@{a.layer}" for a in warnings_})[:12],
                found=bool(warnings_) and not run.healthy,
                placed=placed and not run.healthy,
                error=result.error,
                bare_ms=bare.median_step * 1e3,
                library_ms=result.median_step * 1e3,
            )
        )
        print(f"  {run.name}: {rows[-1].alarms or 'quiet'} {rows[-1].error or ''}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class LibraryRow:
    """One library's line of the table."""

    library: str
    version: str
    healthy_quiet: int = 0
    healthy: int = 0
    found: int = 0
    placed: int = 0
    broken: int = 0
    crashes: int = 0
    overhead: float = math.nan
    status: str = "ok"
    runs: list[RunRow] = field(default_factory=list)


def _version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return "not installed"


def summarise(library: str, version: str, rows: list[RunRow], status: str = "ok") -> LibraryRow:
    """One library's counts over its run rows.

    Example:
        >>> row = summarise("x", "1.0", [RunRow("a", True, alarms=["k@l"]), RunRow("b", False, error="E")])
        >>> (row.healthy_quiet, row.healthy, row.crashes, row.broken)
        (0, 1, 1, 1)
    """
    healthy = [r for r in rows if r.healthy]
    broken = [r for r in rows if not r.healthy]
    ratios = [r.library_ms / r.bare_ms for r in rows if r.error is None and r.bare_ms > 0]
    ratios = [ratio for ratio in ratios if math.isfinite(ratio)]
    return LibraryRow(
        library,
        version,
        healthy_quiet=sum(not r.alarms and r.error is None for r in healthy),
        healthy=len(healthy),
        found=sum(r.found for r in broken),
        placed=sum(r.placed for r in broken),
        broken=len(broken),
        crashes=sum(r.error is not None for r in rows),
        overhead=statistics.median(ratios) - 1.0 if ratios else math.nan,
        status=status,
        runs=rows,
    )


def _worker_command(library: str, adapter: str, runs: tuple[str, ...], out: Path) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.competitors", "--worker", library, "--adapter", adapter]
    command += ["--out", str(out)]
    for spec in runs:
        command += ["--run", spec]
    return command


def run_isolated(library: str, adapter: str, runs: tuple[str, ...], timeout: float) -> LibraryRow:
    """Run one library in its own process; not installed, a crash of the process or a timeout is a row."""
    version = _version(library)
    with tempfile.TemporaryDirectory(prefix="gradlight-competitors-") as folder:
        out = Path(folder) / "rows.json"
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        command = _worker_command(library, adapter, runs, out)
        try:  # in a scratch folder: some libraries write report files into the working directory
            done = subprocess.run(command, cwd=folder, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return summarise(library, version, [], status=f"timed out after {timeout:.0f} s")
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            return summarise(library, version, [], status=f"process failed (exit {done.returncode}): {tail}")
        rows = [RunRow(**row) for row in json.loads(out.read_text(encoding="utf-8"))]
    return summarise(library, version, rows)


def render(table: list[LibraryRow]) -> str:
    """The side-by-side table, then each library's alarms per run."""
    head = ["library", "version", "healthy runs without an alarm", "broken runs found", "with the faulty layer"]
    head += ["crashes", "every-step overhead", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        overhead = f"{row.overhead * 100:+.0f}%" if math.isfinite(row.overhead) else "-"
        cells = [row.library, row.version, f"{row.healthy_quiet}/{row.healthy}", f"{row.found}/{row.broken}"]
        cells += [f"{row.placed}/{row.broken}", f"{row.crashes}/{row.healthy + row.broken}", overhead, row.status]
        lines.append("| " + " | ".join(cells) + " |")
    for row in table:
        lines += ["", f"{row.library}:"]
        for r in row.runs:
            state = f"CRASH {r.error}" if r.error else (", ".join(r.alarms) or "quiet")
            label = "healthy" if r.healthy else "broken"
            lines.append(f"  {r.run} ({label}, {r.bare_ms:.1f} -> {r.library_ms:.1f} ms/step): {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", action="append", help=f"only these libraries (of {sorted(ADAPTERS)})")
    parser.add_argument("--run", action="append", help="only these runs ('zoo:<name>' or 'buggy:<program>')")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per library (default 900)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = tuple(args.run) if args.run else RUNS
    if args.worker:
        rows = run_library(args.adapter, runs)
        args.out.write_text(json.dumps([asdict(r) for r in rows]), encoding="utf-8")
        return 0
    unknown = sorted(set(args.library or ()) - set(ADAPTERS))
    if unknown:
        parser.error(f"unknown --library {unknown}; valid are {sorted(ADAPTERS)}.")
    chosen = args.library or list(ADAPTERS)
    start = time.perf_counter()
    table = []
    for library in chosen:
        print(f"{library} ...", file=sys.stderr, flush=True)
        table.append(run_isolated(library, ADAPTERS[library], runs, args.timeout))
    from benchmarks.buggy_programs import commit

    command = "python -m benchmarks.competitors " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command.strip()}  (commit {commit()}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s)\n")
    print(render(table))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in table], indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
