"""The parent-to-child contract: what one run's subprocess is told, as a typed record (``spec.json``).

Example:
    >>> from casestudies.detection.grid.config import GridConfig
    >>> spec = RunSpec.of("intact", GridConfig(out="/tmp/grid"), "/tmp/grid/data/shapes/shapes.yaml")
    >>> spec.run_dir, spec.epochs
    ('/tmp/grid/runs/intact', 8)
    >>> RunSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casestudies.detection.grid.config import BASELINE, GridConfig


def processes(name: str, devices: int) -> int:
    """Processes that run ``name`` trains with on ``devices`` (the baseline: one on a machine without CUDA).

    Every Lightning variant trains with ``devices`` processes (GPUs, or CPU processes without GPUs); the
    Ultralytics baseline too on GPUs, but in one process without CUDA, which its DDP needs.

    Example:
        >>> processes("intact", 2)
        2
    """
    import torch

    return 1 if name == BASELINE and not torch.cuda.is_available() else devices


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid, as its subprocess receives it.

    Attributes:
        name: Variant name, or ``ultralytics`` for the baseline.
        run_dir: Absolute folder of the run (``OUT/runs/<name>`` or ``OUT/seed-<s>/runs/<name>``).
        data: Data YAML both trainers read (synthetic data already generated, overfit split derived).
        model: Model YAML.
        epochs: Training epochs.
        imgsz: Image size.
        batch: Batch size per optimizer step (all devices together).
        workers: Dataloader workers on GPU.
        devices: Number of devices.
        log_every_n_steps: Gradient-flow logging interval in optimizer steps.
        backward_signal: Tap the backward signal on logged steps (Lightning variants and the baseline).
        precision: Lightning precision of a variant (``32-true`` or ``64-true``).
        augment: Ultralytics augmentation overrides.
        training: Recipe overrides.
        seed: Seed of the initial weights and of the data order.
        resume: Continue an unfinished run found in ``run_dir``.
    """

    name: str
    run_dir: str
    data: str
    model: str
    epochs: int
    imgsz: int
    batch: int
    workers: int
    devices: int
    log_every_n_steps: int
    backward_signal: bool = True
    precision: str = "32-true"
    augment: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    resume: bool = False

    @classmethod
    def of(cls, name: str, config: GridConfig, data_yaml: str) -> RunSpec:
        """The spec of run ``name`` of ``config``, on the prepared ``data_yaml``."""
        return cls(
            name=name,
            run_dir=str(Path(config.out).resolve() / "runs" / name),
            data=data_yaml,
            model=config.model,
            epochs=config.epochs,
            imgsz=config.imgsz,
            batch=config.batch,
            workers=config.workers,
            devices=config.devices,
            log_every_n_steps=config.log_every_n_steps,
            backward_signal=config.backward_signal,
            precision=config.precision,
            augment=dict(config.augment),
            training=dict(config.training),
            seed=config.seed,
            resume=config.resume,
        )

    def to_json(self) -> str:
        """The record as the JSON text of ``spec.json``."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Read a record written by :meth:`to_json`.

        Raises:
            ValueError: If the JSON has fields a ``RunSpec`` does not know, or lacks required ones.
        """
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"spec has unknown fields {unknown}; a RunSpec has {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(f"spec is not a complete RunSpec: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        """Read ``spec.json``."""
        return cls.from_json(Path(path).read_text())
