"""The data set of a grid: the synthetic shapes generated, a local YAML resolved, the overfit split derived.

Example:
    >>> from casestudies.detection.grid.config import GridConfig
    >>> prepare_data(GridConfig(data="/data/coco8/coco8.yaml"))  # doctest: +SKIP
    '/data/coco8/coco8.yaml'
"""

from __future__ import annotations

from pathlib import Path

import yaml

from casestudies.detection.grid.config import GridConfig


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
