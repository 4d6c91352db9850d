"""Train the ablation grid and the Ultralytics baseline, then compare gradient flow and mAP in one report.

Launch commands::

    scripts/ablate_detector.sh                       # offline default: synthetic shapes, 6 variants + baseline
    scripts/ablate_detector.sh --preset smoke        # < 3 min end to end (what the tests run)
    scripts/ablate_detector.sh --resume --out runs/ablate_detector   # continue an interrupted grid
    scripts/ablate_detector.sh --seeds 0,1,2 --out runs/seeds        # once per seed, then mean/std/min/max
    python -m casestudies.detection.grid --preset coco8-overfit --data /tmp/coco8/coco8.yaml
    python -m casestudies.detection.grid --preset coco --devices 8  # GPUs, DDP

Every run (one per variant, plus ``ultralytics``) goes to ``OUT/runs/<name>/`` and is trained in its own
subprocess (clean memory, and Lightning's DDP launcher re-runs that subprocess's command per rank). A run is
finished when its ``result.json`` exists; ``--resume`` skips finished runs, continues an unfinished Lightning
run from ``checkpoints/last.ckpt`` (the gradlight monitor continues its history) and an unfinished baseline
from ``ultralytics/weights/last.pt`` (Ultralytics' own resume; its history continues too). At the end:
``OUT/summary.csv``/``.json``, ``OUT/report.html`` and the plots ``OUT/map_vs_grad_ratio.png``,
``OUT/loss_curves.png``, ``OUT/grad_profiles.png``.

With ``--seeds 0,1,2`` each seed's grid is one such folder, ``OUT/seed-<s>/`` (seeds change the initial
weights and the data order; the synthetic data set is generated once, in ``OUT/data``, unless ``--vary-data``),
and :mod:`casestudies.detection.seeds` aggregates them into ``OUT/aggregate.csv``/``.json``,
``OUT/per_seed.csv`` and error-bar plots. ``--resume`` then skips every finished seed-variant pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from casestudies.detection.variants import get_variant

if TYPE_CHECKING:  # heavy imports happen where they are used, so --help and bad options answer fast
    import lightning as L

    from casestudies.detection.baseline import BaselineConfig

BASELINE = "ultralytics"
STANDARD_VARIANTS = ("intact", "no_residual", "no_bn", "no_residual_no_bn", "sigmoid", "stripped_sigmoid")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "detection" / "presets"
#: Test hook, ``"<run>:<epoch>"``: that run (a variant or ``ultralytics``) exits hard at batch 1 of that epoch,
#: like a kill after the previous epoch's checkpoint (same name as ``baseline.CRASH_ENV``).
CRASH_ENV = "GRADLIGHT_GRID_CRASH"
RESULT = "result.json"


class GridError(ValueError):
    """A bad option, found before any training starts."""


@dataclass
class GridConfig:
    """Everything one grid needs; presets fill it, command-line options override it.

    Attributes:
        preset: Preset name (``configs/detection/presets/<preset>.yaml``).
        data: ``synthetic``, a data YAML path, or a bare dataset name Ultralytics ships (downloads).
        model: Model YAML (``yolo11n.yaml``, ``yolo26n.yaml``, ...).
        variants: Runs to make: grid variant names and ``ultralytics`` for the baseline.
        epochs: Training epochs of every run.
        imgsz: Image size.
        batch: Batch size per optimizer step (all devices together); Ultralytics' ``nbs`` is set to it.
        workers: Dataloader workers on GPU (on CPU both trainers use 0, as Ultralytics forces).
        devices: Number of devices (GPUs; DDP when more than one). 1 on CPU.
        out: Output folder.
        resume: Skip finished runs, continue unfinished ones.
        log_every_n_steps: Gradient-flow logging interval in optimizer steps.
        overfit: Evaluate on the training images (the COCO8 overfit protocol).
        synthetic: Size of the generated dataset (``train``, ``val``, ``imgsz``) when ``data`` is synthetic.
        augment: Ultralytics augmentation overrides for both trainers (``mosaic: 0.0``, ...).
        training: Recipe overrides for every run (``lr0``, ``warmup_epochs``, ...; both trainers).
        seed: Seed of the initial weights and of the training loop (data order) of a single-seed grid.
        seeds: Train the whole grid once per seed, into ``OUT/seed-<s>/``, then aggregate over seeds
            (``OUT/aggregate.csv``); empty means one grid with ``seed`` directly in ``OUT``.
        vary_data: With ``seeds``, generate the synthetic data set anew per seed (its seed = the run seed);
            by default every seed trains on the same data set (``synthetic`` drawn with seed 0).
        description: What the preset is for.
    """

    preset: str = "default"
    data: str = "synthetic"
    model: str = "yolo11n.yaml"
    variants: list[str] = field(default_factory=lambda: [*STANDARD_VARIANTS, BASELINE])
    epochs: int = 8
    imgsz: int = 128
    batch: int = 32
    workers: int = 2
    devices: int = 1
    out: str = "runs/ablate_detector"
    resume: bool = False
    log_every_n_steps: int = 2
    overfit: bool = False
    synthetic: dict[str, int] = field(default_factory=lambda: {"train": 600, "val": 100, "imgsz": 128})
    augment: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seeds: list[int] = field(default_factory=list)
    vary_data: bool = False
    description: str = ""


# ----------------------------------------------------------------------------------------------- options
def available_presets() -> list[str]:
    """Names of the presets in ``configs/detection/presets``."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """Read a preset file into a dict of :class:`GridConfig` fields.

    Raises:
        GridError: If there is no such preset or it has unknown keys.
    """
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise GridError(f"--preset {name!r} does not exist; available: {', '.join(available_presets())}")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(GridConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GridError(f"preset {path} has unknown keys {unknown}; valid keys: {sorted(known)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/ablate_detector.sh`` / ``python -m casestudies.detection.grid``."""
    parser = argparse.ArgumentParser(
        prog="ablate_detector.sh",
        description="Train YOLO ablation variants (Lightning + gradlight) and the Ultralytics baseline, then "
        "write OUT/summary.csv, OUT/summary.json, OUT/report.html and plots comparing gradient flow and mAP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument("--preset", default="default", help="settings to start from (default: %(default)s)")
    parser.add_argument("--data", help="'synthetic', a data YAML path, or a bare name Ultralytics ships")
    parser.add_argument("--model", help="model YAML for every run, e.g. yolo11n.yaml or yolo26n.yaml")
    parser.add_argument(
        "--variants", help=f"comma-separated runs: {', '.join(STANDARD_VARIANTS)}, {BASELINE} (the baseline)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs of every run")
    parser.add_argument("--imgsz", type=int, help="image size")
    parser.add_argument("--batch", type=int, help="batch size per optimizer step (Ultralytics nbs = batch)")
    parser.add_argument("--devices", type=int, help="GPUs per run; more than 1 trains with DDP")
    parser.add_argument("--workers", type=int, help="dataloader workers on GPU (CPU runs use 0)")
    parser.add_argument("--log-every-n-steps", type=int, help="gradient-flow logging interval")
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 0,1,2: the grid once per seed (initial weights and data order), "
        "into OUT/seed-<s>/, then OUT/aggregate.csv with mean, std, min and max per variant",
    )
    parser.add_argument(
        "--vary-data",
        action="store_true",
        help="with --seeds: a new synthetic data set per seed (default: one fixed data set for every seed)",
    )
    parser.add_argument("--out", help="output folder (default: runs/ablate_detector/<preset>)")
    parser.add_argument("--resume", action="store_true", help="skip finished runs in OUT, continue unfinished ones")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: train one run from its spec file
    return parser


def _epilog() -> str:
    lines = ["presets (configs/detection/presets/*.yaml):"]
    for name in available_presets():
        description = (load_preset(name).get("description") or "").strip()
        lines.append(f"  {name:<15}{description}")
    lines += [
        "",
        "variants:",
        "  intact             Ultralytics' architecture and recipe, trained by Lightning",
        "  no_residual        every additive shortcut of the backbone off",
        "  no_bn              BatchNorm removed in the backbone (conv bias, lr0 0.002)",
        "  no_residual_no_bn  both",
        "  sigmoid            sigmoid activations in the backbone",
        "  stripped_sigmoid   sigmoid + no residual + no BN",
        f"  {BASELINE:<18} the unmodified model trained by Ultralytics' own DetectionTrainer",
        "",
        "outputs: OUT/runs/<variant>/ (history in gradlight/, result.json, loss.csv, checkpoints),",
        "  OUT/summary.csv, OUT/summary.json, OUT/report.html, OUT/*.png",
        "--resume: finished runs (result.json present) are kept; an unfinished Lightning run continues from",
        "  its checkpoints/last.ckpt, an unfinished baseline from its weights/last.pt (Ultralytics' resume).",
        "",
        "examples:",
        "  scripts/ablate_detector.sh",
        "  scripts/ablate_detector.sh --preset smoke --out /tmp/smoke",
        "  scripts/ablate_detector.sh --seeds 0,1,2 --out runs/seeds   # then OUT/aggregate.csv",
        "  scripts/ablate_detector.sh --variants intact,no_bn,ultralytics --epochs 4",
        "  scripts/ablate_detector.sh --preset coco8-overfit --data /tmp/coco8/coco8.yaml",
        "  scripts/ablate_detector.sh --preset coco --devices 8",
    ]
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> GridConfig:
    """Preset values, then command-line overrides; validated (raises :class:`GridError`)."""
    values = load_preset(args.preset)
    values["preset"] = args.preset
    for name in ("data", "model", "epochs", "imgsz", "batch", "devices", "workers", "log_every_n_steps"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.variants is not None:
        values["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.seeds is not None:
        values["seeds"] = _parse_seeds(args.seeds)
    if args.vary_data:
        values["vary_data"] = True
    values["out"] = args.out or str(Path("runs/ablate_detector") / args.preset)
    values["resume"] = bool(args.resume)
    config = GridConfig(**values)
    validate(config)
    return config


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GridError(f"--seeds {text!r} is not valid; give comma-separated integers such as 0,1,2") from None


def validate(config: GridConfig) -> None:
    """Check every option before anything trains.

    Raises:
        GridError: Naming the bad option and what would be valid.
    """
    _check_variants(config.variants)
    for name in ("epochs", "imgsz", "batch", "devices", "log_every_n_steps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GridError(f"--{name.replace('_', '-')} {value!r} is not valid; it must be a positive integer")
    if config.imgsz < 32 or config.imgsz % 32:
        raise GridError(f"--imgsz {config.imgsz} is not valid; use a multiple of 32 (the YOLO stride)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise GridError(f"--seeds {config.seeds!r} is not valid; give non-negative integers such as 0,1,2")
    if len(set(config.seeds)) != len(config.seeds):
        raise GridError(f"--seeds lists a seed twice: {','.join(map(str, config.seeds))}")
    if config.vary_data and not (config.seeds and config.data == "synthetic"):
        raise GridError("--vary-data needs --seeds and --data synthetic (only the generated data set has a seed)")
    if config.workers < 0:
        raise GridError(f"--workers {config.workers} is not valid; it must be 0 or more")
    _check_model(config.model)
    _check_data(config.data)
    _check_out(Path(config.out), config.resume)
    _check_resume_settings(config)
    if config.devices > 1 and _gpu_count() < config.devices:
        raise GridError(f"--devices {config.devices} needs {config.devices} GPUs; found {_gpu_count()}")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_variants(variants: list[str]) -> None:
    valid = (*STANDARD_VARIANTS, BASELINE)
    unknown = [v for v in variants if v not in valid]
    if unknown:
        raise GridError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not variants:
        raise GridError(f"--variants is empty; give at least one of {', '.join(valid)}")
    if len(set(variants)) != len(variants):
        raise GridError(f"--variants lists a run twice: {','.join(variants)}")


def _ultralytics_cfg_dir() -> Path:
    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None, "ultralytics is not installed"
    return Path(spec.origin).parent / "cfg"


def _check_model(model: str) -> None:
    if not model.endswith((".yaml", ".yml")):
        raise GridError(f"--model {model!r} is not valid; give a model YAML such as yolo11n.yaml (no weights)")
    if Path(model).exists():
        return
    stem = Path(model).stem
    base = stem.rstrip("nslmx") if stem[-1:] in "nslmx" else stem
    packaged = list((_ultralytics_cfg_dir() / "models").rglob(f"{base}.yaml"))
    if not packaged or "/" in model:
        raise GridError(f"--model {model!r} is neither a file nor a model YAML Ultralytics ships")


def _check_data(data: str) -> None:
    if data == "synthetic":
        return
    if Path(data).expanduser().exists():
        _check_local_data(Path(data).expanduser())
        return
    bare = "/" not in data and data.endswith((".yaml", ".yml"))
    if bare and (_ultralytics_cfg_dir() / "datasets" / data).exists():
        return  # Ultralytics downloads it (GPU machines with internet access)
    raise GridError(
        f"--data {data!r} does not exist; give 'synthetic', an existing data YAML, or the bare name of a "
        "dataset Ultralytics ships (e.g. coco8.yaml, downloaded on first use)"
    )


def _check_local_data(path: Path) -> None:
    """Read a local data YAML as both trainers will (never downloading); its image folders must exist."""
    from casestudies.detection.data import resolve_data

    if not path.is_file():
        raise GridError(f"--data {str(path)!r} is a folder; give the data YAML file inside it")
    try:
        checked = resolve_data(str(path), allow_download=False)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, yaml.YAMLError) as error:
        message = " ".join(str(error).replace("❌", "").split())
        raise GridError(f"--data {str(path)!r} is not a usable data YAML: {message}") from error
    for split in ("train", "val"):
        entries = checked.get(split) or []
        missing = [str(p) for p in (entries if isinstance(entries, list) else [entries]) if not Path(p).exists()]
        if missing:
            raise GridError(
                f"--data {str(path)!r}: the {split!r} images are missing at {', '.join(missing)}; fix the paths "
                "in the YAML (a YAML without 'path:' resolves them relative to its own folder)"
            )


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GridError(f"--out {str(out)!r} is a file; give a folder")
    results = [*out.glob(f"runs/*/{RESULT}"), *out.glob(f"seed-*/runs/*/{RESULT}")]
    finished = sorted(str(p.parent.relative_to(out)).removeprefix("runs/") for p in results)
    if finished and not resume:
        raise GridError(
            f"--out {str(out)!r} already holds finished runs ({', '.join(finished)}); pass --resume to keep "
            "them and continue, or choose a new --out"
        )


#: Settings a resumed grid must share with the runs already in OUT (the variant list may change).
RESUME_KEYS = ("data", "model", "epochs", "imgsz", "batch", "log_every_n_steps", "overfit", "synthetic")
RESUME_KEYS += ("augment", "training", "seed", "vary_data")


def _check_resume_settings(config: GridConfig) -> None:
    path = Path(config.out) / "grid.json"
    if not config.resume or not path.exists():
        return
    defaults = GridConfig()
    previous = {key: getattr(defaults, key) for key in RESUME_KEYS} | json.loads(path.read_text())
    changed = [
        f"{key} {previous[key]!r} -> {getattr(config, key)!r}"
        for key in RESUME_KEYS
        if previous[key] != getattr(config, key)
    ]
    if bool(previous.get("seeds")) != bool(config.seeds):  # more seeds may be added, layouts never mixed
        changed.append(f"seeds {previous.get('seeds') or []!r} -> {config.seeds!r}")
    if changed:
        raise GridError(
            f"--resume would mix settings with the runs in {str(config.out)!r}: {'; '.join(changed)}. Use the "
            "same options as before, or a new --out"
        )


# ----------------------------------------------------------------------------------------------------- runs
def run_info(name: str, config: GridConfig) -> dict[str, Any]:
    """The descriptive columns of a run's summary row (switches of the variant)."""
    if name == BASELINE:
        switches = {"residual": True, "batchnorm": True, "activation": "silu"}
        return {"variant": name, "model": config.model, "trainer": "ultralytics", **switches}
    ablation = get_variant(name).ablation
    return {
        "variant": name,
        "model": config.model,
        "trainer": "lightning",
        "residual": ablation.residual,
        "batchnorm": ablation.batchnorm,
        "activation": ablation.activation or "silu",
    }


def prepare_data(config: GridConfig, data_seed: int = 0) -> str:
    """Resolve the data option to a data YAML both trainers read (generating or deriving it if needed).

    Generated or derived files go to ``OUT/data``; ``data_seed`` is the synthetic data set's seed.
    """
    out = Path(config.out)
    data = config.data
    if data == "synthetic":
        from casestudies.detection.synthetic import generate_shapes_dataset

        sizes = config.synthetic
        root = out / "data" / "shapes"
        data = str(generate_shapes_dataset(root, sizes["train"], sizes["val"], sizes["imgsz"], seed=data_seed))
    elif Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    if config.overfit:
        data = str(_overfit_yaml(data, out / "data"))
    return data


def _overfit_yaml(data: str, folder: Path) -> Path:
    """A data YAML whose val split is the train split (absolute paths), for the overfit protocol."""
    from casestudies.detection.data import resolve_data

    checked = resolve_data(data, allow_download=True)
    folder.mkdir(parents=True, exist_ok=True)
    derived = {"train": str(checked["train"]), "val": str(checked["train"]), "names": dict(checked["names"])}
    path = folder / f"{Path(data).stem}-overfit.yaml"
    path.write_text(yaml.safe_dump(derived, sort_keys=False))
    return path


def child_spec(name: str, config: GridConfig, data_yaml: str) -> dict[str, Any]:
    """What a run's subprocess needs (written to ``OUT/runs/<name>/spec.json``)."""
    run_dir = Path(config.out).resolve() / "runs" / name
    return {
        "name": name,
        "run_dir": str(run_dir),
        "data": data_yaml,
        "model": config.model,
        "epochs": config.epochs,
        "imgsz": config.imgsz,
        "batch": config.batch,
        "workers": config.workers,
        "devices": config.devices,
        "log_every_n_steps": config.log_every_n_steps,
        "augment": config.augment,
        "training": config.training,
        "seed": config.seed,
        "resume": config.resume,
    }


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its ``result.json`` exists."""
    return (run_dir / RESULT).exists()


def launch(spec: dict[str, Any], resume: bool) -> subprocess.Popen:
    """Start one run's subprocess; its output goes to ``run_dir/train.log``."""
    run_dir = Path(spec["run_dir"])
    if not resume:
        # a fresh start: nothing finished lives here (checked before), so stale partial files go
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    log = open(run_dir / "train.log", "a")  # noqa: SIM115 - closed by the caller via the process
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "casestudies.detection.grid", "--child", str(run_dir / "spec.json")]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())


class Progress:
    """One progress bar across the grid, in epochs, fed by each run's ``progress.json``."""

    def __init__(self, names: list[str], epochs: int) -> None:  # one name per run, repeated per seed
        from tqdm import tqdm

        self.epochs = epochs
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=len(names) * epochs,
            unit="epoch",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not interactive,  # logs and pipes get one line per finished run instead
        )
        self.done = 0.0

    def update(self, tag: str, name: str, run_dir: Path) -> None:
        """Show the run ``tag`` (``[2/7]``, ``[seed 1 2/7]``) at the epoch its ``progress.json`` reports."""
        try:
            epoch = float(json.loads((run_dir / "progress.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            epoch = 0.0
        self.bar.set_description(f"{tag} {name} epoch {min(epoch, self.epochs):.1f}/{self.epochs}")
        self._advance_to(self.done + min(epoch, self.epochs))

    def write(self, message: str) -> None:
        """Print a line above the bar (or on its own when there is no bar)."""
        if self.bar.disable:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def finish_run(self) -> None:
        """Count a whole run as done."""
        self.done += self.epochs
        self._advance_to(self.done)

    def _advance_to(self, value: float) -> None:
        self.bar.n = round(value, 2)
        self.bar.refresh()

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def seed_config(config: GridConfig, seed: int) -> GridConfig:
    """The single-seed grid of one seed of a multi-seed ``config`` (its folder ``OUT/seed-<seed>``)."""
    from casestudies.detection.seeds import seed_dir

    return dataclasses.replace(config, seed=seed, seeds=[], out=str(seed_dir(Path(config.out), seed)))


def run_grid(config: GridConfig) -> int:
    """Train every run (skipping finished ones under ``--resume``), then summarise. Returns an exit code.

    With ``config.seeds`` the grid is trained once per seed (``OUT/seed-<s>/``, each with its own summary)
    and aggregated over seeds (``OUT/aggregate.csv``); the data set is prepared once in ``OUT/data`` unless
    ``vary_data`` asks for one per seed.
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
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the running subprocess too, like Ctrl-C
    failed: list[str] = []
    try:
        for grid in grids:
            data_yaml = shared or prepare_data(grid, data_seed=grid.seed)
            if config.seeds:
                Path(grid.out).mkdir(parents=True, exist_ok=True)
                (Path(grid.out) / "grid.json").write_text(json.dumps(dataclasses.asdict(grid), indent=2))
            prefix = f"seed {grid.seed} " if config.seeds else ""
            for index, name in enumerate(names, start=1):
                if not _train_one(index, name, grid, data_yaml, progress, prefix):
                    failed.append(f"{prefix}{name}")
            frame = finish(grid, names)
            print(_format(frame))
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted; continue with: scripts/ablate_detector.sh --resume --out {out}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    progress.close()
    if config.seeds:
        from casestudies.detection import seeds as seed_stats

        table = seed_stats.finish_seeds(out, config.seeds, names)
        print(f"\naggregate over seeds {','.join(map(str, config.seeds))} (mean ± std [min, max]):")
        print(seed_stats.format_aggregate(table))
    if failed:
        print(f"failed runs: {', '.join(failed)} (see their train.log)", file=sys.stderr)
    return 1 if failed else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _train_one(index: int, name: str, config: GridConfig, data_yaml: str, progress: Progress, prefix: str = "") -> bool:
    spec = child_spec(name, config, data_yaml)
    run_dir = Path(spec["run_dir"])
    tag = f"[{prefix}{index}/{len(config.variants)}]"
    if config.resume and is_finished(run_dir):
        progress.write(f"{tag} {name}: finished earlier, kept")
        progress.finish_run()
        return True
    started = time.time()
    if progress.bar.disable:
        progress.write(f"{tag} {name}: training ({'resuming' if config.resume else 'new'})")
    process = launch(spec, config.resume)
    try:
        while process.poll() is None:
            progress.update(tag, name, run_dir)
            time.sleep(1.0)
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)
        raise
    progress.finish_run()
    if process.returncode != 0 or not is_finished(run_dir):
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
        progress.write(f"{tag} {name}: FAILED (exit {process.returncode})\n  " + "\n  ".join(tail))
        return False
    result = json.loads((run_dir / RESULT).read_text())
    progress.write(
        f"{tag} {name}: {time.time() - started:.0f} s, mAP50-95 {result['map50_95']:.3f}, "
        f"{result['images_per_s']:.1f} img/s"
    )
    return True


def finish(config: GridConfig, names: list[str]) -> Any:
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


def _format(frame: Any) -> str:
    from casestudies.detection import summary

    return "\n" + summary.format_table(frame)


# ---------------------------------------------------------------------------------------------- child side
def run_child(spec_path: str) -> int:
    """Train one run from its spec (inside the run's subprocess); writes ``result.json`` when done."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    if spec["name"] == BASELINE:
        from casestudies.detection.baseline import train_baseline

        train_baseline(baseline_config(spec))
    else:
        train_variant(spec)
    return 0


def run_recorder(run_dir: Path, name: str) -> L.Callback:
    """A Lightning callback: per-step loss (``loss.csv``), training time and images, progress, crash hook.

    Its counters are saved in checkpoints, so a resumed run reports throughput over all its epochs.
    """
    from lightning.pytorch.callbacks import Callback

    from casestudies.detection.baseline import crash_epoch, write_progress

    class RunRecorder(Callback):
        def __init__(self, run_dir: Path) -> None:
            super().__init__()
            self.run_dir = Path(run_dir)
            self.train_seconds = 0.0
            self.images_seen = 0
            self._epoch_start = 0.0
            self._crash_epoch = crash_epoch(name)

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._epoch_start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            images = int(batch["img"].shape[0])
            value = float(loss.detach()) / (images * trainer.world_size)
            if trainer.is_global_zero:
                with open(self.run_dir / "loss.csv", "a") as file:
                    file.write(f"{trainer.global_step - 1},{trainer.current_epoch},{value:.6g}\n")
                fraction = (batch_idx + 1) / max(int(trainer.num_training_batches), 1)
                if batch_idx % 5 == 0:
                    write_progress(self.run_dir, trainer.current_epoch + fraction, int(trainer.max_epochs or 0))
            if trainer.current_epoch == self._crash_epoch and batch_idx == 1:
                os._exit(3)  # test hook: die like a killed process, mid-epoch, after the last checkpoint

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self.images_seen += len(trainer.train_dataloader.dataset) if trainer.train_dataloader else 0
            if trainer.is_global_zero:
                write_progress(self.run_dir, trainer.current_epoch + 1, int(trainer.max_epochs or 0))

        def state_dict(self) -> dict[str, Any]:
            return {"train_seconds": self.train_seconds, "images_seen": self.images_seen}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.train_seconds = float(state_dict.get("train_seconds", 0.0))
            self.images_seen = int(state_dict.get("images_seen", 0))

    return RunRecorder(run_dir)


def train_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one Lightning variant with the gradlight monitor; resume from ``last.ckpt``; score the EMA."""
    import lightning as L

    from casestudies.detection.evaluate import evaluate_detector
    from gradlight.history import write_json_atomic

    run_dir = Path(spec["run_dir"])
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = last.exists()
    if not resuming and os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # DDP: rank 0 only
        (run_dir / "loss.csv").write_text("step,epoch,loss\n")
    L.seed_everything(spec["seed"], verbose=False)
    datamodule, module = _build_lightning(spec)
    recorder = run_recorder(run_dir, spec["name"])
    load_start = os.getloadavg()[0]
    trainer = _lightning_trainer(spec, recorder, overwrite=not resuming)
    trainer.fit(module, datamodule, ckpt_path=str(last) if resuming else None)
    if not trainer.is_global_zero:
        return {}
    scores = evaluate_detector(
        module.eval_model, spec["data"], imgsz=spec["imgsz"], batch=spec["batch"], device=module.device
    )
    result = {
        "trainer": "lightning",
        "params": sum(p.numel() for p in module.model.parameters()),
        "epochs": spec["epochs"],
        "train_seconds": round(recorder.train_seconds, 2),
        "images_per_s": round(recorder.images_seen / max(recorder.train_seconds, 1e-9), 2),
        "optimizer_steps": trainer.global_step,
        "map50_95": scores["map50_95"],
        "map50": scores["map50"],
        "resumed": resuming,
        "load_avg_start": round(load_start, 2),  # a shared machine's load skews images_per_s
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    write_json_atomic(run_dir / RESULT, result)
    return result


def _build_lightning(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    from casestudies.detection.data import YoloDataModule
    from casestudies.detection.module import DetectorModule

    gpu = torch.cuda.is_available()
    per_device = max(spec["batch"] // spec["devices"], 1)
    datamodule = YoloDataModule(
        spec["data"],
        imgsz=spec["imgsz"],
        batch_size=per_device,
        workers=spec["workers"] if gpu else 0,
        augment=spec["augment"] or None,
        allow_download=True,
    )
    module = DetectorModule(
        spec["model"],
        variant=spec["name"],
        num_classes=datamodule.num_classes,
        names=datamodule.names,
        training={**spec["training"], "nbs": spec["batch"]},
        init_seed=spec["seed"],
    )
    return datamodule, module


def _lightning_trainer(spec: dict[str, Any], recorder: L.Callback, overwrite: bool) -> L.Trainer:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gradlight import GradientFlowMonitor

    run_dir = Path(spec["run_dir"])
    monitor = GradientFlowMonitor(
        log_every_n_steps=spec["log_every_n_steps"], save_dir=run_dir / "gradlight", overwrite=overwrite
    )
    # One file, overwritten every epoch: `save_last` alone saves nothing when no top-k checkpoint is saved.
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    gpu = torch.cuda.is_available()
    return L.Trainer(
        max_epochs=spec["epochs"],
        accelerator="gpu" if gpu else "cpu",
        devices=spec["devices"] if gpu else 1,
        strategy="ddp" if gpu and spec["devices"] > 1 else "auto",
        callbacks=[monitor, recorder, checkpoint],
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )


def baseline_config(spec: dict[str, Any]) -> BaselineConfig:
    """The :class:`~casestudies.detection.baseline.BaselineConfig` of a run spec."""
    import torch

    from casestudies.detection.baseline import BaselineConfig

    gpu = torch.cuda.is_available()
    device = ",".join(str(i) for i in range(spec["devices"])) if gpu else "cpu"
    recipe = {k: v for k, v in spec["training"].items() if k not in ("nbs", "ema", "ema_tau", "grad_clip_norm")}
    return BaselineConfig(
        data=spec["data"],
        run_dir=spec["run_dir"],
        model=spec["model"],
        epochs=spec["epochs"],
        imgsz=spec["imgsz"],
        batch=spec["batch"],
        workers=spec["workers"] if gpu else 0,
        device=device,
        log_every_n_steps=spec["log_every_n_steps"],
        init_seed=spec["seed"],
        resume=bool(spec.get("resume", False)),
        overrides={**recipe, **spec["augment"], "seed": spec["seed"]},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/ablate_detector.sh``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child)
    try:
        config = config_from_args(args)
    except GridError as error:
        print(f"ablate_detector: error: {error}", file=sys.stderr)
        return 2
    return run_grid(config)


if __name__ == "__main__":
    sys.exit(main())
