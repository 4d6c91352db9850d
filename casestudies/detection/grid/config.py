"""What one grid is: :class:`GridConfig`, the presets that fill it, and the names of its runs.

Example:
    >>> config = GridConfig(**load_preset("smoke"))
    >>> config.variants
    ['intact', 'stripped_sigmoid', 'ultralytics']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from casestudies.detection.variants import VARIANTS

#: The run trained by Ultralytics' own ``DetectionTrainer`` (the unmodified model).
BASELINE = "ultralytics"
#: The Lightning variants in grid order (declared once: :data:`casestudies.detection.variants.VARIANTS`).
STANDARD_VARIANTS: tuple[str, ...] = tuple(VARIANTS)
PRESET_DIR = Path(__file__).resolve().parents[3] / "configs" / "detection" / "presets"
#: A run is finished when this file exists in its folder.
RESULT = "result.json"
#: Settings a resumed grid must share with the runs already in OUT (the variant and seed lists may change).
RESUME_KEYS: tuple[str, ...] = ("data", "model", "epochs", "imgsz", "batch", "log_every_n_steps", "overfit")
RESUME_KEYS += ("synthetic", "augment", "training", "seed", "vary_data", "backward_signal", "precision")
#: ``--no-augment``: Ultralytics' training augmentation off in both trainers (what ``coco8-overfit`` sets).
NO_AUGMENT: dict[str, float] = {
    "mosaic": 0.0,
    "fliplr": 0.0,
    "scale": 0.0,
    "translate": 0.0,
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.0,
}
#: Lightning precisions the grid's variants train with (the Ultralytics baseline always trains in float32).
PRECISIONS: tuple[str, ...] = ("32-true", "64-true")


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
        devices: Number of devices: GPUs (DDP when more than one), or on a machine without GPUs, CPU
            processes (DDP over gloo) for the Lightning variants, the baseline then in one process.
        out: Output folder.
        resume: Skip finished runs, continue unfinished ones.
        log_every_n_steps: Gradient-flow logging interval in optimizer steps.
        backward_signal: Tap the backward signal of every run on logged steps (the Lightning variants'
            ``GradientFlowMonitor(track_backward_signal=True)``, the baseline's Ultralytics recording): the
            gradient with respect to each YOLO block's output and each block's gain (``signal_*`` rows of the
            history; the signal heat map and gain profile in the report). On by default; its cost is measured
            in ``docs/detection.md``.
        precision: Lightning ``precision`` of the variants: ``"32-true"`` or ``"64-true"`` (float64 weights
            and activations, for numerical checks such as ``--devices N`` against one process); the baseline
            trains in float32 either way.
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
    backward_signal: bool = True
    precision: str = "32-true"
    overfit: bool = False
    synthetic: dict[str, int] = field(default_factory=lambda: {"train": 600, "val": 100, "imgsz": 128})
    augment: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seeds: list[int] = field(default_factory=list)
    vary_data: bool = False
    description: str = ""


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


def seed_config(config: GridConfig, seed: int) -> GridConfig:
    """The single-seed grid of one seed of a multi-seed ``config`` (its folder ``OUT/seed-<seed>``)."""
    from casestudies.detection.seeds import seed_dir

    return dataclasses.replace(config, seed=seed, seeds=[], out=str(seed_dir(Path(config.out), seed)))
