"""COCO mAP for any model with Ultralytics-style outputs, scored by pycocotools.

Protocol (the canonical COCO one, with Ultralytics' validator settings for the predictions):

1. Ground truth: the YOLO labels of the split, converted once to a COCO JSON dict (cached beside the labels,
   keyed by a fingerprint of the label files). Box area is the box area (YOLO labels have no masks), which
   only matters for the small/medium/large breakdown, not for the "all" numbers reported here.
2. Predictions: ``model(img)`` in eval mode on Ultralytics' letterboxed val batches (``rect=True`` like the
   validator), ``ultralytics.utils.nms.non_max_suppression(conf=0.001, iou=0.7, multi_label=True,
   max_det=300)``, boxes mapped back from letterboxed pixels to original image pixels with ``scale_boxes`` and
   the batch's ``ratio_pad``, then the top 100 per image by score.
3. Score: ``COCOeval`` with ``maxDets=[1, 10, 100]``; mAP50-95 and mAP50 are read from ``eval["precision"]``
   (area "all", 100 detections) rather than ``stats`` so they stay valid if ``max_dets`` changes.

:func:`evaluate_detector` is the entry point; :func:`coco_map` scores hand-made cases;
:func:`cross_check` scores one set of predictions three ways (pycocotools, torchmetrics, Ultralytics).

Example:
    >>> gt = {"images": [{"id": 1, "width": 100, "height": 100}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 50],
    ...                        "area": 2500, "iscrowd": 0}],
    ...       "categories": [{"id": 0, "name": "thing"}]}
    >>> coco_map(gt, [{"image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 50], "score": 0.9}])
    {'map50_95': 1.0, 'map50': 1.0}
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from ultralytics.data.utils import exif_size
from ultralytics.utils import nms, ops

from casestudies.detection.data import build_dataset, resolve_data

#: Ultralytics validator settings for the NMS that feeds mAP.
NMS_SETTINGS: dict[str, Any] = {"conf_thres": 0.001, "iou_thres": 0.7, "multi_label": True, "max_det": 300}
#: Detections per image that COCO scores.
COCO_MAX_DETS = 100


# ----------------------------------------------------------------------------------------------- ground truth
def _label_fingerprint(dataset: Any) -> str:
    digest = hashlib.sha1()
    for label in sorted(dataset.labels, key=lambda lb: lb["im_file"]):
        digest.update(label["im_file"].encode())
        digest.update(np.ascontiguousarray(label["cls"], dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(label["bboxes"], dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def image_ids(im_files: Iterable[str]) -> dict[str, int]:
    """Give each image file a COCO image id (1-based, in sorted path order).

    Example:
        >>> image_ids(["b.jpg", "a.jpg"])
        {'a.jpg': 1, 'b.jpg': 2}
    """
    return {path: index for index, path in enumerate(sorted(set(im_files)), start=1)}


def yolo_labels_to_coco(dataset: Any, names: dict[int, str]) -> dict[str, Any]:
    """Convert an Ultralytics ``YOLODataset``'s labels (normalised xywh) to a COCO ground-truth dict.

    Args:
        dataset: A built ``YOLODataset`` (its ``labels`` list is read; images are only opened for their size).
        names: Class names by index; every class becomes a category whose id is the class index.

    Returns:
        A dict with ``images``, ``annotations`` (xywh pixels, ``iscrowd=0``) and ``categories``.
    """
    ids = image_ids(label["im_file"] for label in dataset.labels)
    images, annotations = [], []
    for label in sorted(dataset.labels, key=lambda lb: ids[lb["im_file"]]):
        width, height = exif_size(Image.open(label["im_file"]))
        image_id = ids[label["im_file"]]
        images.append({"id": image_id, "file_name": label["im_file"], "width": width, "height": height})
        for cls, (cx, cy, w, h) in zip(label["cls"].reshape(-1), label["bboxes"].reshape(-1, 4)):
            box = [
                float((cx - w / 2) * width),
                float((cy - h / 2) * height),
                float(w * width),
                float(h * height),
            ]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(i), "name": str(name)} for i, name in sorted(names.items())]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_ground_truth(dataset: Any, names: dict[int, str], cache: bool = True) -> dict[str, Any]:
    """Return the COCO ground truth of ``dataset``, read from or written to a cache beside its labels.

    The cache file is ``labels/<split>.coco.json`` (next to Ultralytics' ``<split>.cache``); it is rebuilt
    when the labels change. An unwritable folder just skips the cache.
    """
    fingerprint = _label_fingerprint(dataset)
    cache_path = Path(dataset.label_files[0]).parent.with_suffix(".coco.json") if dataset.label_files else None
    if cache and cache_path is not None and cache_path.exists():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache_path.read_text())
            if cached.get("fingerprint") == fingerprint:
                return cached["ground_truth"]
    ground_truth = yolo_labels_to_coco(dataset, names)
    if cache and cache_path is not None:
        with contextlib.suppress(OSError):
            staging = cache_path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(json.dumps({"fingerprint": fingerprint, "ground_truth": ground_truth}))
            os.replace(staging, cache_path)
    return ground_truth


# ------------------------------------------------------------------------------------------------ predictions
def postprocess(preds: Any, end2end: bool = False) -> list[torch.Tensor]:
    """Apply the validator's NMS to raw outputs; return per image ``(n, 6)`` xyxy, conf, cls (letterbox px).

    Example:
        >>> out = postprocess(torch.zeros(1, 4 + 2, 10))
        >>> out[0].shape
        torch.Size([0, 6])
    """
    return nms.non_max_suppression(preds, **NMS_SETTINGS, end2end=end2end)


def detections_to_coco(
    detections: Sequence[torch.Tensor],
    batch: dict[str, Any],
    ids: dict[str, int],
    max_dets: int = COCO_MAX_DETS,
) -> list[dict[str, Any]]:
    """Map NMS outputs of one batch back to original pixels and return COCO result dicts.

    Args:
        detections: Per image ``(n, 6)`` tensors in letterboxed pixels of ``batch["img"]``.
        batch: The collated Ultralytics batch (``img``, ``im_file``, ``ori_shape``, ``ratio_pad``).
        ids: Image id by file path (see :func:`image_ids`).
        max_dets: Keep this many highest-scoring detections per image.
    """
    letterbox_shape = tuple(batch["img"].shape[2:])
    results = []
    for index, det in enumerate(detections):
        det = det[det[:, 4].argsort(descending=True)[:max_dets]].detach().float().cpu()
        boxes = ops.scale_boxes(
            letterbox_shape, det[:, :4].clone(), batch["ori_shape"][index], batch["ratio_pad"][index]
        )
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        image_id = ids[batch["im_file"][index]]
        for box, score, cls in zip(xywh.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": [round(v, 3) for v in box],
                    "score": score,
                }
            )
    return results


def _head(model: nn.Module) -> nn.Module | None:
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, nn.Sequential) else None


def uses_end2end_head(model: nn.Module) -> bool:
    """True when the model's head is set to its NMS-free one-to-one branch (YOLO26 with ``end2end=True``)."""
    head = _head(model)
    return bool(getattr(head, "end2end", False)) if head is not None else False


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    ids: dict[str, int],
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Run ``model`` over ``loader`` (uint8 Ultralytics batches) and return COCO detections.

    The model is put in eval mode for the pass and restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    end2end = uses_end2end_head(model)
    results: list[dict[str, Any]] = []
    try:
        for batch in loader:
            images = batch["img"].to(device).float() / 255
            detections = postprocess(model(images), end2end=end2end)
            results.extend(detections_to_coco(detections, batch, ids))
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------------ score
def coco_map(
    ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]], max_dets: int = COCO_MAX_DETS
) -> dict[str, float]:
    """Score COCO detections against a COCO ground-truth dict with pycocotools' ``COCOeval`` (bbox).

    Args:
        ground_truth: COCO dict with ``images``, ``annotations``, ``categories``.
        detections: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        max_dets: Detections per image considered (COCO uses 100).

    Returns:
        ``{"map50_95": ..., "map50": ...}``; 0.0 without detections, NaN without ground truth.

    Example:
        >>> gt = {"images": [{"id": 1, "width": 100, "height": 100}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [0, 0, 100, 100],
        ...                        "area": 10000, "iscrowd": 0}],
        ...       "categories": [{"id": 0, "name": "thing"}]}
        >>> coco_map(gt, [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 100, 72], "score": 0.9}])
        {'map50_95': 0.5, 'map50': 1.0}
    """
    if max_dets < 1:
        raise ValueError(f"max_dets={max_dets!r} is not valid; it must be a positive integer.")
    if not ground_truth.get("annotations"):
        return {"map50_95": float("nan"), "map50": float("nan")}
    if not detections:
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(ground_truth)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(detections)))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.maxDets = sorted({1, 10, max_dets})
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, class] at area "all", max_dets
    return {"map50_95": _mean_valid(precision), "map50": _mean_valid(precision[0])}


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return round(float(valid.mean()), 6) if valid.size else float("nan")


def _prepare(data: Any, split: str, imgsz: int, batch: int, rect: bool, workers: int) -> tuple[dict, Any]:
    data_dict = resolve_data(data, allow_download=False)
    dataset = build_dataset(data_dict, split, imgsz, batch, mode="val", rect=rect)
    ground_truth = coco_ground_truth(dataset, dict(data_dict["names"]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=dataset.collate_fn
    )
    return ground_truth, loader


def evaluate_detector(
    model: nn.Module,
    data: str | Path | dict[str, Any],
    imgsz: int = 640,
    batch: int = 16,
    split: str = "val",
    rect: bool = True,
    workers: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Score a detector with COCO mAP50-95 and mAP50 (pycocotools) on a split of a YOLO-format dataset.

    Works for any ``nn.Module`` whose eval-mode output is what Ultralytics' ``Detect`` head returns (the
    Lightning-trained models here, or a ``DetectionModel`` trained by Ultralytics' own trainer).

    Args:
        model: The detector; evaluated in eval mode and left in the mode it had.
        data: A data YAML path, ``"synthetic"``, or a data dict from :func:`resolve_data`.
        imgsz: Letterbox size of the evaluation images.
        batch: Images per forward pass.
        split: Which split of the data YAML to score (``"val"``, ``"train"``, ``"test"``).
        rect: Rectangular letterbox batches like Ultralytics' validator (True) or square ``imgsz`` (False).
        workers: DataLoader worker processes.
        device: Where to run; defaults to the model's device.

    Returns:
        ``{"map50_95": float, "map50": float, "images": int, "detections": int}``.

    Example:
        >>> import tempfile
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> root = tempfile.mkdtemp()
        >>> data = resolve_data("synthetic", synthetic_root=root, synthetic_train=2, synthetic_val=2)
        >>> scores = evaluate_detector(DetectionModel("yolo11n.yaml", nc=3, verbose=False), data, imgsz=64)
        >>> scores["images"], 0.0 <= scores["map50_95"] <= 1.0
        (2, True)
    """
    if imgsz < 32 or batch < 1:
        raise ValueError(f"imgsz={imgsz!r} and batch={batch!r} are not valid; use imgsz >= 32 and batch >= 1.")
    ground_truth, loader = _prepare(data, split, imgsz, batch, rect, workers)
    ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    detections = predict_coco(model, loader, ids, device)
    scores = coco_map(ground_truth, detections)
    return {**scores, "images": len(ground_truth["images"]), "detections": len(detections)}


# ------------------------------------------------------------------------------------------------ cross-check
def torchmetrics_map(ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Score the same detections with torchmetrics' ``MeanAveragePrecision`` (pycocotools backend)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xywh", iou_type="bbox", backend="pycocotools")
    preds, targets = [], []
    for image in ground_truth["images"]:
        dets = [d for d in detections if d["image_id"] == image["id"]]
        gts = [a for a in ground_truth["annotations"] if a["image_id"] == image["id"]]
        preds.append(
            {
                "boxes": torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                "labels": torch.tensor([d["category_id"] for d in dets], dtype=torch.long),
            }
        )
        targets.append(
            {
                "boxes": torch.tensor([a["bbox"] for a in gts], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([a["category_id"] for a in gts], dtype=torch.long),
            }
        )
    metric.update(preds, targets)
    with contextlib.redirect_stdout(io.StringIO()):
        result = metric.compute()
    return {"map50_95": round(float(result["map"]), 6), "map50": round(float(result["map_50"]), 6)}


def ultralytics_map(ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Score the same detections the way Ultralytics' validator does (greedy matching + ``ap_per_class``)."""
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    validator = DetectionValidator()
    tps, confs, pred_classes, target_classes = [], [], [], []
    for image in ground_truth["images"]:
        dets = sorted((d for d in detections if d["image_id"] == image["id"]), key=lambda d: -d["score"])
        gts = [a for a in ground_truth["annotations"] if a["image_id"] == image["id"]]
        gt_cls = torch.tensor([a["category_id"] for a in gts], dtype=torch.float32)
        det_cls = torch.tensor([d["category_id"] for d in dets], dtype=torch.float32)
        target_classes.append(gt_cls.numpy())
        if not dets:
            continue
        iou = box_iou(_xyxy([a["bbox"] for a in gts]), _xyxy([d["bbox"] for d in dets]))
        tps.append(validator.match_predictions(det_cls, gt_cls, iou).numpy())
        confs.append(np.array([d["score"] for d in dets]))
        pred_classes.append(det_cls.numpy())
    if not tps:
        return {"map50_95": 0.0, "map50": 0.0}
    ap = ap_per_class(
        np.concatenate(tps),
        np.concatenate(confs),
        np.concatenate(pred_classes),
        np.concatenate(target_classes),
    )[5]
    return {"map50_95": round(float(ap.mean()), 6), "map50": round(float(ap[:, 0].mean()), 6)}


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    tensor[:, 2:] += tensor[:, :2]
    return tensor


def cross_check(ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Score one set of detections with pycocotools, torchmetrics and Ultralytics' metric code.

    Example:
        >>> gt = {"images": [{"id": 1, "width": 100, "height": 100}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 50],
        ...                        "area": 2500, "iscrowd": 0}],
        ...       "categories": [{"id": 0, "name": "thing"}]}
        >>> det = {"image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 50], "score": 1.0}
        >>> sorted(cross_check(gt, [det]))
        ['pycocotools', 'torchmetrics', 'ultralytics']
    """
    return {
        "pycocotools": coco_map(ground_truth, detections),
        "torchmetrics": torchmetrics_map(ground_truth, detections),
        "ultralytics": ultralytics_map(ground_truth, detections),
    }


def cross_check_detector(
    model: nn.Module, data: Any, imgsz: int = 640, batch: int = 16, split: str = "val", rect: bool = True
) -> dict[str, dict[str, float]]:
    """Predict once with ``model`` and score the same detections with the three scorers of :func:`cross_check`."""
    ground_truth, loader = _prepare(data, split, imgsz, batch, rect, workers=0)
    ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    return cross_check(ground_truth, predict_coco(model, loader, ids))
