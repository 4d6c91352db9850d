"""Synthetic data generation, data resolution (clear errors, no download for local paths), DataModule batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from casestudies.detection import offline

offline.configure_offline()

from casestudies.detection.data import GlobalBatchSampler, YoloDataModule, resolve_data  # noqa: E402
from casestudies.detection.synthetic import generate_shapes_dataset  # noqa: E402


def test_synthetic_generation_is_deterministic_and_valid(tmp_path: Path) -> None:
    first = generate_shapes_dataset(tmp_path / "a", num_train=6, num_val=3, imgsz=64, seed=3)
    second = generate_shapes_dataset(tmp_path / "b", num_train=6, num_val=3, imgsz=64, seed=3)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*.*") if p.suffix in {".png", ".txt"})
    assert len(files) == 18
    for relative in files:
        assert (first.parent / relative).read_bytes() == (second.parent / relative).read_bytes()
    for label_file in (first.parent / "labels" / "train").glob("*.txt"):
        rows = np.loadtxt(label_file, ndmin=2)
        assert 1 <= len(rows) <= 3
        assert set(rows[:, 0].astype(int)) <= {0, 1, 2}
        assert ((rows[:, 1:] > 0) & (rows[:, 1:] <= 1)).all()


def test_synthetic_generation_is_reused_when_unchanged(tmp_path: Path) -> None:
    yaml_path = generate_shapes_dataset(tmp_path, num_train=2, num_val=2, imgsz=64)
    stamp = os.stat(yaml_path.parent / "images" / "train" / "train_00000.png").st_mtime_ns
    generate_shapes_dataset(tmp_path, num_train=2, num_val=2, imgsz=64)
    assert os.stat(yaml_path.parent / "images" / "train" / "train_00000.png").st_mtime_ns == stamp


def test_missing_data_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"data='/no/such/place/data.yaml' does not exist"):
        resolve_data("/no/such/place/data.yaml")
    with pytest.raises(ValueError, match=r"no_such_dataset\.yaml"):
        resolve_data("no_such_dataset.yaml")  # not a file Ultralytics ships either


def test_datamodule_serves_uint8_ultralytics_batches(coco8_yaml: Path) -> None:
    dm = YoloDataModule(str(coco8_yaml), imgsz=64, batch_size=2, workers=0)
    assert dm.num_classes == 80 and dm.names[0] == "person"
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["img"].dtype == torch.uint8 and batch["img"].shape == (2, 3, 64, 64)
    assert {"cls", "bboxes", "batch_idx", "im_file", "ori_shape", "ratio_pad"} <= set(batch)
    assert len(dm.val_dataloader().dataset) == 4
    overfit = YoloDataModule(str(coco8_yaml), imgsz=64, batch_size=2, workers=0, overfit=True)
    assert overfit.data["val"] == overfit.data["train"]


def test_datamodule_rejects_bad_sizes(coco8_yaml: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        YoloDataModule(str(coco8_yaml), batch_size=0)


@pytest.mark.parametrize(("size", "batch", "ranks"), [(32, 4, 2), (30, 4, 2), (29, 3, 3), (9, 4, 2)])
def test_ranks_share_out_the_one_process_global_batches(size: int, batch: int, ranks: int) -> None:
    one = GlobalBatchSampler(size, batch * ranks, seed=3)
    parts = [GlobalBatchSampler(size, batch, ranks, rank, seed=3) for rank in range(ranks)]
    for epoch in (0, 1):
        for sampler in (one, *parts):
            sampler.set_epoch(epoch)
        order = list(one)
        assert sorted(order) == list(range(size))  # every image once per epoch
        global_batches = [order[i : i + batch * ranks] for i in range(0, size, batch * ranks)]
        per_rank = [list(part) for part in parts]
        assert [len(indices) for indices in per_rank] == [len(part) for part in parts]
        batches = [[indices[i : i + batch] for i in range(0, len(indices), batch)] for indices in per_rank]
        assert len({len(b) for b in batches}) == 1  # the same number of steps on every rank
        for step, expected in enumerate(global_batches):
            if len(expected) < ranks:  # too small to give every rank an image: left out under DDP
                assert step == len(global_batches) - 1 and step == len(batches[0])
                continue
            joined = [index for rank_batches in batches for index in rank_batches[step]]
            assert joined == expected, (epoch, step)  # rank r: the r-th slice of the same global batch
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # a new permutation each epoch


def test_global_batch_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        GlobalBatchSampler(8, 0)
    with pytest.raises(ValueError, match="rank=2 of num_replicas=2"):
        GlobalBatchSampler(8, 2, num_replicas=2, rank=2)
