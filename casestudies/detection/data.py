"""Data for the detection case study: Ultralytics' YOLO datasets and augmentation in a LightningDataModule.

The data argument names one of:

* ``"synthetic"``: the embedded offline default, generated on first use by
  :func:`casestudies.detection.synthetic.generate_shapes_dataset`;
* a path to a data YAML (``coco8.yaml``, ``coco.yaml``, your own), read by Ultralytics' ``check_det_dataset``
  exactly as its trainer reads it. A path that does not exist is an error naming it;
* a bare file name that Ultralytics ships (e.g. ``"coco8.yaml"``) when no such local file exists: only
  then may Ultralytics download the dataset (never in tests).

Loaders are plain ``torch.utils.data.DataLoader`` objects using the dataset's ``collate_fn``, so Lightning can
insert its ``DistributedSampler`` under DDP. Images stay ``uint8``; the LightningModule divides by 255.

Example:
    >>> import tempfile
    >>> dm = YoloDataModule("synthetic", imgsz=64, batch_size=4, workers=0, synthetic_root=tempfile.mkdtemp(),
    ...                     synthetic_train=8, synthetic_val=4)
    >>> dm.num_classes, dm.names[0]
    (3, 'circle')
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import DEFAULT_CFG, ROOT

from casestudies.detection import offline as _offline
from casestudies.detection.synthetic import generate_shapes_dataset

SYNTHETIC = "synthetic"
#: Model stride used for rectangular batch shapes (Ultralytics uses max(model stride, 32)).
GRID_STRIDE = 32


def default_synthetic_root() -> Path:
    """Folder where the synthetic dataset is generated unless told otherwise.

    Example:
        >>> default_synthetic_root().name
        'shapes'
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "gradlight" / "shapes"


def _packaged_dataset_yaml(name: str) -> Path | None:
    if os.sep in name or "/" in name or not name.endswith((".yaml", ".yml")):
        return None
    packaged = Path(ROOT) / "cfg" / "datasets" / name
    return packaged if packaged.exists() else None


def resolve_data(
    data: str | Path | dict[str, Any],
    *,
    allow_download: bool = True,
    synthetic_root: str | Path | None = None,
    synthetic_train: int = 1000,
    synthetic_val: int = 200,
    synthetic_imgsz: int = 128,
) -> dict[str, Any]:
    """Turn a data argument into Ultralytics' checked data dict (``train``, ``val``, ``nc``, ``names``, ...).

    Args:
        data: ``"synthetic"``, a data YAML path, a bare packaged name like ``"coco8.yaml"``, or an already
            checked dict (returned unchanged).
        allow_download: Let Ultralytics fetch a packaged dataset named without a local file. Local YAMLs are
            never downloaded for: missing images are an error.
        synthetic_root: Where to generate the synthetic dataset (default :func:`default_synthetic_root`).
        synthetic_train: Synthetic training images.
        synthetic_val: Synthetic validation images.
        synthetic_imgsz: Synthetic image side in pixels.

    Returns:
        The data dict from ``check_det_dataset``.

    Raises:
        ValueError: If the path does not exist and is not a dataset Ultralytics knows how to fetch.

    Example:
        >>> resolve_data("no/such/data.yaml")
        Traceback (most recent call last):
        ...
        ValueError: data='no/such/data.yaml' does not exist; give an existing data YAML, 'synthetic', or the bare name of a dataset Ultralytics ships (e.g. 'coco8.yaml').
    """  # noqa: E501
    if isinstance(data, dict):
        return data
    name = str(data)
    if name == SYNTHETIC:
        root = Path(synthetic_root) if synthetic_root else default_synthetic_root()
        yaml_path = generate_shapes_dataset(root, synthetic_train, synthetic_val, synthetic_imgsz)
        return check_det_dataset(str(yaml_path), autodownload=False)
    if Path(name).expanduser().exists():
        return check_det_dataset(str(Path(name).expanduser().resolve()), autodownload=False)
    if _packaged_dataset_yaml(name) is not None and allow_download:
        return check_det_dataset(name, autodownload=True)
    raise ValueError(
        f"data={name!r} does not exist; give an existing data YAML, 'synthetic', or the bare name of a "
        "dataset Ultralytics ships (e.g. 'coco8.yaml')."
    )


def ultralytics_cfg(imgsz: int, overrides: dict[str, Any] | None = None) -> Any:
    """Return Ultralytics' default cfg namespace with ``imgsz``, offline settings and ``overrides`` applied.

    Example:
        >>> ultralytics_cfg(64, {"mosaic": 0.0}).mosaic
        0.0
    """
    merged = {**_offline.OFFLINE_OVERRIDES, "imgsz": imgsz, **(overrides or {})}
    return get_cfg(DEFAULT_CFG, merged)


def build_dataset(
    data: dict[str, Any],
    split: str,
    imgsz: int,
    batch: int,
    mode: str,
    rect: bool,
    overrides: dict | None = None,
) -> Dataset:
    """Build Ultralytics' ``YOLODataset`` for ``data[split]``, ``mode`` ``"train"`` (augmented) or ``"val"``.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> data = resolve_data("synthetic", synthetic_root=root, synthetic_train=2, synthetic_val=2)
        >>> len(build_dataset(data, "val", imgsz=64, batch=2, mode="val", rect=False))
        2
    """
    if split not in data:
        raise ValueError(
            f"split={split!r} is not in the data dict; available: {[k for k in ('train', 'val', 'test') if k in data]}."
        )
    cfg = ultralytics_cfg(imgsz, overrides)
    return build_yolo_dataset(cfg, data[split], batch, data, mode=mode, rect=rect, stride=GRID_STRIDE)


class GlobalBatchSampler(DistributedSampler):
    """The training order of one process, split so that N processes see the same global batches.

    Every epoch draws one permutation of the data set from ``seed + epoch`` (the same on every rank), cuts it
    into global batches of ``batch_size * num_replicas`` images and gives rank ``r`` the ``r``-th slice of
    ``batch_size`` images of each. With a ``DataLoader(batch_size=batch_size)`` per rank, step ``k`` of the
    ``N`` ranks together trains on exactly the images of step ``k`` of one process with the global batch
    (what Lightning's ``DistributedSampler``, which deals images out in turn, does not give). A last,
    incomplete global batch is split as evenly as the ranks allow; if it has fewer images than ranks it is
    left out (with one process it never is). Being a ``DistributedSampler``, Lightning keeps it under DDP
    rather than inserting its own, and calls :meth:`set_epoch` every epoch.

    Args:
        size: Images in the data set.
        batch_size: Images per step and rank.
        num_replicas: Ranks (data-parallel processes).
        rank: This rank.
        seed: Seed of the permutations.
        shuffle: Draw a permutation each epoch (else the data set order).

    Example:
        >>> [list(GlobalBatchSampler(8, 2, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
        [[0, 1, 4, 5], [2, 3, 6, 7]]
        >>> list(GlobalBatchSampler(8, 4, shuffle=False))
        [0, 1, 2, 3, 4, 5, 6, 7]
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not valid; it must be a positive integer.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank={rank!r} of num_replicas={num_replicas!r} is not valid; need 0 <= rank < num_replicas."
            )
        self.size, self.batch_size = size, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch = 0

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def _slices(self) -> Iterator[torch.Tensor]:
        order, step = self._order(), self.batch_size * self.num_replicas
        for start in range(0, self.size, step):
            batch = order[start : start + step]
            if len(batch) >= self.num_replicas:
                yield torch.tensor_split(batch, self.num_replicas)[self.rank]

    def __iter__(self) -> Iterator[int]:
        for indices in self._slices():
            yield from indices.tolist()

    def __len__(self) -> int:
        return sum(len(indices) for indices in self._slices())


class YoloDataModule(L.LightningDataModule):
    """Ultralytics YOLO datasets and augmentation, served by plain DataLoaders.

    Args:
        data: ``"synthetic"``, a data YAML path, or a bare packaged dataset name (see :func:`resolve_data`).
        imgsz: Training and validation image size.
        batch_size: Images per batch and process (under DDP every rank loads this many).
        workers: DataLoader worker processes.
        seed: Seed of the training order (:class:`GlobalBatchSampler`: one permutation per epoch, the same
            global batches for any number of processes).
        overfit: Evaluate on the training images (the "overfit" protocol for tiny sets such as COCO8).
        augment: Ultralytics augmentation overrides (``mosaic``, ``fliplr``, ``hsv_h``, ...).
        close_mosaic: Switch mosaic off for the last this many epochs, as Ultralytics does (runs of at most
            this many epochs never use mosaic).
        allow_download: Allow Ultralytics to fetch a packaged dataset named without a local file.
        synthetic_root: Folder for the synthetic dataset.
        synthetic_train: Synthetic training images.
        synthetic_val: Synthetic validation images.
        synthetic_imgsz: Side of the generated synthetic images.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> dm = YoloDataModule("synthetic", imgsz=64, batch_size=2, workers=0, synthetic_root=root,
        ...                     synthetic_train=2, synthetic_val=2)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["img"].dtype
        torch.uint8
    """

    def __init__(
        self,
        data: str = SYNTHETIC,
        imgsz: int = 128,
        batch_size: int = 32,
        workers: int = 2,
        seed: int = 0,
        overfit: bool = False,
        augment: dict[str, Any] | None = None,
        close_mosaic: int = 10,
        allow_download: bool = True,
        synthetic_root: str | None = None,
        synthetic_train: int = 1000,
        synthetic_val: int = 200,
        synthetic_imgsz: int = 128,
    ) -> None:
        super().__init__()
        for name, value in (("imgsz", imgsz), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer.")
        if workers < 0:
            raise ValueError(f"workers={workers!r} is not valid; it must be 0 or more.")
        self.save_hyperparameters()
        self.imgsz, self.batch_size, self.workers = imgsz, batch_size, workers
        self.seed = seed
        self.augment = dict(augment or {})
        self.close_mosaic = close_mosaic
        self.data = resolve_data(
            data,
            allow_download=allow_download,
            synthetic_root=synthetic_root,
            synthetic_train=synthetic_train,
            synthetic_val=synthetic_val,
            synthetic_imgsz=synthetic_imgsz,
        )
        if overfit:
            self.data = {**self.data, "val": self.data["train"]}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the data YAML."""
        return int(self.data["nc"])

    @property
    def names(self) -> dict[int, str]:
        """Class names by index."""
        return dict(self.data["names"])

    def prepare_data(self) -> None:
        """Build both datasets once on local rank 0: Ultralytics writes label caches before ranks read."""
        build_dataset(self.data, "train", self.imgsz, self.batch_size, "train", rect=False, overrides=self.augment)
        build_dataset(self.data, "val", self.imgsz, self.batch_size, "val", rect=False)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (train only when fitting)."""
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = build_dataset(
                self.data, "train", self.imgsz, self.batch_size, "train", rect=False, overrides=self.augment
            )
            self.update_epoch(0)
        if self.val_dataset is None:
            # Square letterbox (rect=False): DDP shards the val set, so one batch can mix images of different
            # rectangular shapes. evaluate_detector() uses Ultralytics' rect batches when run on its own.
            self.val_dataset = build_dataset(self.data, "val", self.imgsz, self.batch_size, "val", rect=False)

    def update_epoch(self, epoch: int) -> None:
        """Close mosaic once ``epoch`` enters the last ``close_mosaic`` epochs (call before that epoch)."""
        max_epochs = getattr(getattr(self, "trainer", None), "max_epochs", None)
        dataset = self.train_dataset
        if dataset is None or max_epochs is None or max_epochs < 0 or getattr(dataset, "_mosaic_closed", False):
            return
        if self.close_mosaic and epoch >= max_epochs - self.close_mosaic:
            dataset.close_mosaic(hyp=ultralytics_cfg(self.imgsz, self.augment))
            dataset._mosaic_closed = True

    def _loader(self, dataset: Dataset, sampler: GlobalBatchSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=dataset.collate_fn,
            persistent_workers=False,  # fresh workers each epoch pick up close_mosaic()
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches (uint8 images); under DDP this rank's part of each global batch."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        ranks, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
        sampler = GlobalBatchSampler(len(self.train_dataset), self.batch_size, ranks, rank, seed=self.seed)
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order (uint8 images, letterboxed to ``imgsz``)."""
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset)
