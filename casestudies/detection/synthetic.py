"""A deterministic synthetic detection dataset in YOLO format: filled shapes on textured backgrounds.

Each image holds 1-3 objects of three classes (circle, square, triangle) in random colours on a smooth random
background with pixel noise. Boxes are the tight bounds of the drawn shapes. Generation is seeded and takes a
couple of seconds for the default 1000 train / 200 val images at 128 px, so it is the offline default data of
the case study: a small detector learns it to clearly non-zero mAP in minutes on a laptop CPU.

Example:
    >>> import tempfile
    >>> yaml_path = generate_shapes_dataset(tempfile.mkdtemp(), num_train=4, num_val=2, imgsz=64)
    >>> yaml_path.name
    'shapes.yaml'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
_MARKER = "generated.json"


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate; the same spec always yields byte-identical files.

    Args:
        num_train: Training images.
        num_val: Validation images.
        imgsz: Side of the square images in pixels.
        max_objects: At most this many shapes per image (at least one).
        seed: Seed of the whole dataset.
    """

    num_train: int = 1000
    num_val: int = 200
    imgsz: int = 128
    max_objects: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "max_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; it must be at least 1.")
        if self.imgsz < 32:
            raise ValueError(f"imgsz={self.imgsz!r} is not valid; use at least 32 pixels.")

    def fingerprint(self) -> str:
        """Return a short hash identifying this spec."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0.0, 14.0, size=(size, size, 3)).astype(np.float32)
    return np.clip(smooth + noise, 0, 255)


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        union = (x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter
        if inter / union > 0.2:
            return True
    return False


def _draw_shape(image: np.ndarray, cls: int, box: tuple[int, int, int, int], color: tuple[float, ...]) -> None:
    x0, y0, x1, y1 = box
    if cls == 0:
        center, radius = ((x0 + x1) // 2, (y0 + y1) // 2), (x1 - x0) // 2
        cv2.circle(image, center, radius, color, thickness=-1, lineType=cv2.LINE_AA)
    elif cls == 1:
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), color, thickness=-1)
    else:
        points = np.array([[(x0 + x1) // 2, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], dtype=np.int32)
        cv2.fillPoly(image, [points], color, lineType=cv2.LINE_AA)


def _contrasting_color(rng: np.random.Generator, background: np.ndarray, box: tuple[int, ...]) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    mean = background[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    color = rng.uniform(0, 255, size=3)
    while np.abs(color - mean).sum() < 150:
        color = rng.uniform(0, 255, size=3)
    return tuple(float(c) for c in color)


def render_image(
    spec: ShapesSpec, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """Draw one image and return it with YOLO labels ``(cls, cx, cy, w, h)`` normalised to [0, 1].

    Example:
        >>> image, labels = render_image(ShapesSpec(imgsz=64), np.random.default_rng(0))
        >>> image.shape, 1 <= len(labels) <= 3
        ((64, 64, 3), True)
    """
    size = spec.imgsz
    image = _background(rng, size)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[tuple[int, float, float, float, float]] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(20):
            side = int(rng.integers(size // 6, int(size / 2.5)))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        _draw_shape(image, cls, box, _contrasting_color(rng, image, box))
        boxes.append(box)
        labels.append((cls, (x0 + side / 2) / size, (y0 + side / 2) / size, side / size, side / size))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _write_split(root: Path, split: str, count: int, spec: ShapesSpec, split_seed: int) -> None:
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng([spec.seed, split_seed, index])
        image, labels = render_image(spec, rng)
        stem = f"{split}_{index:05d}"
        cv2.imwrite(str(image_dir / f"{stem}.png"), image)
        lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
        (label_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def _write_yaml(root: Path) -> Path:
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    text = f"# Synthetic shapes (generated by casestudies.detection.synthetic)\npath: {root}\n"
    text += f"train: images/train\nval: images/val\nnames:\n{names}\n"
    path = root / "shapes.yaml"
    if not path.exists() or path.read_text() != text:
        staging = root / f".shapes.yaml.{os.getpid()}"
        staging.write_text(text)
        os.replace(staging, path)
    return path


def generate_shapes_dataset(
    root: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    imgsz: int = 128,
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` (skipped when the same spec is already there) and return its YAML.

    Args:
        root: Output folder; ``images/{train,val}``, ``labels/{train,val}`` and ``shapes.yaml`` go inside.
        num_train: Training images.
        num_val: Validation images.
        imgsz: Image side in pixels.
        max_objects: Maximum shapes per image.
        seed: Dataset seed.

    Returns:
        Path of the data YAML, readable by Ultralytics' ``check_det_dataset``.

    Example:
        >>> import tempfile
        >>> generate_shapes_dataset(tempfile.mkdtemp(), num_train=2, num_val=1, imgsz=64).exists()
        True
    """
    spec = ShapesSpec(num_train, num_val, imgsz, max_objects, seed)
    root = Path(root).expanduser().resolve()
    if not _is_complete(root, spec):
        # Build in a private folder and rename it into place, so concurrent processes (DDP ranks) never see
        # a half-written dataset; a loser of the race drops its copy.
        staging = root.parent / f".{root.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        _write_split(staging, "train", spec.num_train, spec, split_seed=1)
        _write_split(staging, "val", spec.num_val, spec, split_seed=2)
        (staging / _MARKER).write_text(json.dumps({"fingerprint": spec.fingerprint(), **asdict(spec)}))
        if root.exists() and not _is_complete(root, spec):
            shutil.rmtree(root, ignore_errors=True)  # another spec's files (and Ultralytics label caches)
        try:
            os.rename(staging, root)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(root, spec):
            raise RuntimeError(f"could not create the synthetic dataset at {root}")
    return _write_yaml(root)


def _is_complete(root: Path, spec: ShapesSpec) -> bool:
    marker = root / _MARKER
    try:
        return json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint()
    except (OSError, ValueError):
        return False
