"""Every option of a grid checked before anything trains; each error names the option and what is valid.

Example:
    >>> from casestudies.detection.grid.config import GridConfig
    >>> validate(GridConfig(epochs=0))
    Traceback (most recent call last):
    ...
    casestudies.detection.grid.config.GridError: --epochs 0 is not valid; it must be a positive integer
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from casestudies.detection.grid.config import (
    BASELINE,
    PRECISIONS,
    RESULT,
    RESUME_KEYS,
    STANDARD_VARIANTS,
    GridConfig,
    GridError,
)


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
    if not isinstance(config.backward_signal, bool):
        raise GridError(f"backward_signal {config.backward_signal!r} is not valid; it must be true or false")
    if config.precision not in PRECISIONS:
        raise GridError(f"--precision {config.precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    if config.workers < 0:
        raise GridError(f"--workers {config.workers} is not valid; it must be 0 or more")
    _check_model(config.model)
    _check_data(config.data)
    _check_out(Path(config.out), config.resume)
    _check_resume_settings(config)
    _check_devices(config.devices, config.batch)


def _check_devices(devices: int, batch: int) -> None:
    """N devices: N GPUs when the machine has any, else N CPU processes; each trains batch / N images a step."""
    gpus = _gpu_count()
    if devices > 1 and 0 < gpus < devices:
        raise GridError(f"--devices {devices} needs {devices} GPUs; found {gpus}")
    if batch % devices:
        raise GridError(
            f"--batch {batch} is not divisible by --devices {devices}; every process trains batch / devices "
            f"images per step, so give a batch that is a multiple of {devices}"
        )


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
