"""The parent side of the grid: one subprocess per run, finished runs kept, summaries at the end.

Example:
    >>> from casestudies.detection.grid.config import GridConfig
    >>> run_grid(GridConfig(preset="smoke", out="/tmp/smoke"))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pandas as pd

from casestudies.detection.grid.config import BASELINE, RESULT, GridConfig, seed_config
from casestudies.detection.grid.prepare import prepare_data
from casestudies.detection.grid.progress import Progress
from casestudies.detection.grid.spec import RunSpec, processes
from casestudies.detection.variants import get_variant

#: How the parent starts a run: this command, then the run's ``spec.json``.
CHILD_COMMAND: tuple[str, ...] = (sys.executable, "-m", "casestudies.detection.grid.child")


def run_info(name: str, config: GridConfig) -> dict[str, Any]:
    """The descriptive columns of a run's summary row (switches of the variant)."""
    if name == BASELINE:
        switches = {"residual": True, "batchnorm": True, "activation": "silu"}
        devices = processes(name, config.devices)
        return {"variant": name, "model": config.model, "trainer": "ultralytics", **switches, "devices": devices}
    ablation = get_variant(name).ablation
    return {
        "variant": name,
        "model": config.model,
        "trainer": "lightning",
        "residual": ablation.residual,
        "batchnorm": ablation.batchnorm,
        "activation": ablation.activation or "silu",
        "devices": config.devices,
    }


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its ``result.json`` exists."""
    return (Path(run_dir) / RESULT).exists()


def launch(spec: RunSpec, command: Sequence[str] = CHILD_COMMAND) -> subprocess.Popen:
    """Start one run's subprocess (``command`` + its ``spec.json``); its output goes to ``run_dir/train.log``."""
    run_dir = Path(spec.run_dir)
    if not spec.resume:
        # a fresh start: nothing finished lives here (checked before), so stale partial files go
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    with open(run_dir / "train.log", "a") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [*command, str(run_dir / "spec.json")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
        )


def stop(process: subprocess.Popen, grace_seconds: float = 30.0) -> int:
    """Stop a run's subprocess: SIGTERM, then SIGKILL if it has not exited after ``grace_seconds``.

    Lightning catches SIGTERM and only stops at its next batch boundary, which a loaded machine can take
    longer than any grace period to reach; the kill makes sure no run outlives the grid (a resumed grid would
    otherwise train the same run twice at once). Returns the exit code.
    """
    process.terminate()
    try:
        return process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_grid(config: GridConfig, child_command: Sequence[str] = CHILD_COMMAND) -> int:
    """Train every run (skipping finished ones under ``--resume``), then summarise. Returns an exit code.

    With ``config.seeds`` the grid is trained once per seed (``OUT/seed-<s>/``, each with its own summary)
    and aggregated over seeds (``OUT/aggregate.csv``); the data set is prepared once in ``OUT/data`` unless
    ``vary_data`` asks for one per seed. While it runs, SIGTERM interrupts it like Ctrl-C (the running
    subprocess is stopped too); the previous SIGTERM handler is restored at the end.

    Args:
        config: The grid (validated).
        child_command: How each run's subprocess is started (the spec path is appended).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    names = list(config.variants)
    grids = [seed_config(config, seed) for seed in config.seeds] or [config]
    shared = None if config.vary_data else prepare_data(config)
    seeds = f", seeds {','.join(map(str, config.seeds))}" if config.seeds else ""
    print(f"gradlight ablation grid, preset {config.preset!r}: {', '.join(names)}{seeds} -> {out}", flush=True)
    progress = Progress(names * len(grids), config.epochs)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    failed: list[str] = []
    try:
        for grid in grids:
            data_yaml = shared or prepare_data(grid, data_seed=grid.seed)
            if config.seeds:
                Path(grid.out).mkdir(parents=True, exist_ok=True)
                (Path(grid.out) / "grid.json").write_text(json.dumps(dataclasses.asdict(grid), indent=2))
            prefix = f"seed {grid.seed} " if config.seeds else ""
            for index, name in enumerate(names, start=1):
                spec = RunSpec.of(name, grid, data_yaml)
                if not _train_one(f"[{prefix}{index}/{len(names)}]", spec, progress, child_command):
                    failed.append(f"{prefix}{name}")
            print(_format(finish(grid, names)))
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted; continue with: scripts/ablate_detector.sh --resume --out {out}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    progress.close()
    _aggregate(config)
    if failed:
        print(f"failed runs: {', '.join(failed)} (see their train.log)", file=sys.stderr)
    return 1 if failed else 0


def summarize_grid(config: GridConfig) -> int:
    """Rebuild every summary, plot and report of ``config``'s runs in OUT without training anything.

    Runs that did not finish are rows with ``status`` ``missing`` (and missing seeds in the aggregate).
    Returns 0.
    """
    names = list(config.variants)
    for grid in [seed_config(config, seed) for seed in config.seeds] or [config]:
        print(_format(finish(grid, names)))
    _aggregate(config)
    return 0


def _aggregate(config: GridConfig) -> None:
    if not config.seeds:
        return
    from casestudies.detection import seeds as seed_stats

    table = seed_stats.finish_seeds(Path(config.out), config.seeds, list(config.variants))
    print(f"\naggregate over seeds {','.join(map(str, config.seeds))} (mean ± std [min, max]):")
    print(seed_stats.format_aggregate(table))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _train_one(tag: str, spec: RunSpec, progress: Progress, child_command: Sequence[str]) -> bool:
    run_dir = Path(spec.run_dir)
    if spec.resume and is_finished(run_dir):
        progress.write(f"{tag} {spec.name}: finished earlier, kept")
        progress.finish_run()
        return True
    started = time.time()
    if progress.bar.disable:
        progress.write(f"{tag} {spec.name}: training ({'resuming' if spec.resume else 'new'})")
    if processes(spec.name, spec.devices) < spec.devices:
        progress.write(f"{tag} {spec.name}: one process, Ultralytics' DDP needs CUDA (--devices {spec.devices})")
    process = launch(spec, child_command)
    try:
        while process.poll() is None:
            progress.update(tag, spec.name, run_dir)
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop(process)
        raise
    progress.finish_run()
    if process.returncode != 0 or not is_finished(run_dir):
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
        progress.write(f"{tag} {spec.name}: FAILED (exit {process.returncode})\n  " + "\n  ".join(tail))
        return False
    result = json.loads((run_dir / RESULT).read_text())
    progress.write(
        f"{tag} {spec.name}: {time.time() - started:.0f} s, mAP50-95 {result['map50_95']:.3f}, "
        f"{result['images_per_s']:.1f} img/s"
    )
    return True


def finish(config: GridConfig, names: list[str]) -> pd.DataFrame:
    """Summary files, plots and report of the runs in ``names``."""
    from casestudies.detection import summary

    out = Path(config.out)
    runs = {name: out / "runs" / name for name in names}
    rows = [summary.summarize_run(runs[name], run_info(name, config)) for name in names]
    frame = summary.write_summary(rows, out)
    figures = [
        summary.plot_map_vs_ratio(frame, out / "map_vs_grad_ratio.png"),
        summary.plot_loss_curves(runs, out / "loss_curves.png"),
        summary.plot_gradient_profiles(runs, out / "grad_profiles.png"),
    ]
    summary.write_report(frame, runs, figures, out, title=f"gradlight ablation grid: {config.preset}")
    return frame


def _format(frame: pd.DataFrame) -> str:
    from casestudies.detection import summary

    return "\n" + summary.format_table(frame)
