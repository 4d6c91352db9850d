"""COCO mAP: hand-computed pycocotools answers, agreement of three scorers, letterbox mapping, GT conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from casestudies.detection import offline

offline.configure_offline()

from casestudies.detection.data import build_dataset, resolve_data  # noqa: E402
from casestudies.detection.evaluate import (  # noqa: E402
    coco_ground_truth,
    coco_map,
    cross_check,
    detections_to_coco,
    evaluate_detector,
    image_ids,
)


def ground_truth(boxes: list[list[float]], category: int = 0) -> dict:
    return {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": category, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, box in enumerate(boxes)
        ],
        "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
    }


def det(box: list[float], score: float, category: int = 0) -> dict:
    return {"image_id": 1, "category_id": category, "bbox": box, "score": score}


GT_TWO = ground_truth([[0, 0, 100, 100], [120, 120, 50, 50]])


def test_perfect_predictions_score_one() -> None:
    scores = coco_map(GT_TWO, [det([0, 0, 100, 100], 0.9), det([120, 120, 50, 50], 0.8)])
    assert scores == {"map50_95": 1.0, "map50": 1.0}


def test_half_recall_scores_51_of_101_recall_points() -> None:
    # Recall reaches 0.5 at precision 1; COCO's 101-point interpolation credits recall 0.00 .. 0.50.
    scores = coco_map(GT_TWO, [det([0, 0, 100, 100], 0.9)])
    assert scores["map50"] == pytest.approx(51 / 101, abs=1e-6)
    assert scores["map50_95"] == pytest.approx(51 / 101, abs=1e-6)


def test_iou_072_counts_at_thresholds_050_to_070_only() -> None:
    # IoU = 100*72 / (100*100) = 0.72: a true positive at 0.50, 0.55, 0.60, 0.65, 0.70 (5 of 10 thresholds).
    scores = coco_map(ground_truth([[0, 0, 100, 100]]), [det([0, 0, 100, 72], 0.9)])
    assert scores == {"map50_95": 0.5, "map50": 1.0}


def test_higher_scored_false_positive_halves_precision() -> None:
    # Ranked: a misplaced box (0.95) then the right box (0.9): precision 1/2 at recall 1 -> AP 0.5.
    gt = ground_truth([[0, 0, 100, 100]])
    dets = [det([0, 0, 100, 100], 0.9), det([150, 150, 40, 40], 0.95)]
    assert coco_map(gt, dets) == {"map50_95": 0.5, "map50": 0.5}


def test_no_detections_is_zero_and_no_ground_truth_is_nan() -> None:
    assert coco_map(GT_TWO, []) == {"map50_95": 0.0, "map50": 0.0}
    assert np.isnan(coco_map(ground_truth([]), [det([0, 0, 10, 10], 0.5)])["map50_95"])
    with pytest.raises(ValueError, match="max_dets=0"):
        coco_map(GT_TWO, [], max_dets=0)


def test_three_scorers_agree_on_hand_made_cases() -> None:
    dets = [det([0, 0, 100, 100], 0.9), det([118, 121, 50, 52], 0.7), det([10, 10, 30, 30], 0.6)]
    result = cross_check(GT_TWO, dets)
    assert result["torchmetrics"]["map50_95"] == pytest.approx(result["pycocotools"]["map50_95"], abs=1e-4)
    assert result["ultralytics"]["map50"] == pytest.approx(result["pycocotools"]["map50"], abs=0.02)


def test_detections_map_back_from_letterbox_to_original_pixels() -> None:
    # A 200x100 (w x h) image letterboxed into 64x64: gain 0.32, vertical padding 16 px.
    batch = {
        "img": torch.zeros(1, 3, 64, 64),
        "im_file": ["a.jpg"],
        "ori_shape": [(100, 200)],
        "ratio_pad": [((0.32, 0.32), (0, 16))],
    }
    letterboxed = torch.tensor([[3.2, 16 + 6.4, 35.2, 16 + 22.4, 0.8, 1.0]])  # original (10, 20) - (110, 70)
    (result,) = detections_to_coco([letterboxed], batch, image_ids(["a.jpg"]))
    assert result["category_id"] == 1 and result["image_id"] == 1
    assert result["bbox"] == pytest.approx([10, 20, 100, 50], abs=1e-3)


def test_ground_truth_matches_yolo_labels_and_is_cached(coco8_yaml) -> None:
    data = resolve_data(coco8_yaml)
    dataset = build_dataset(data, "val", imgsz=64, batch=2, mode="val", rect=True)
    gt = coco_ground_truth(dataset, data["names"])
    label = next(lb for lb in dataset.labels if lb["im_file"].endswith("000000000042.jpg"))
    image = next(im for im in gt["images"] if im["file_name"] == label["im_file"])
    (annotation,) = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
    cx, cy, w, h = label["bboxes"][0]
    expected = [(cx - w / 2) * image["width"], (cy - h / 2) * image["height"], w * image["width"], h * image["height"]]
    assert (image["width"], image["height"]) == (640, 478)
    assert annotation["category_id"] == int(label["cls"][0, 0]) == 16
    assert annotation["bbox"] == pytest.approx(expected, abs=1e-3)
    cache = coco8_yaml.parent / "labels" / "val.coco.json"
    assert json.loads(cache.read_text())["ground_truth"] == gt


def test_evaluate_detector_scores_an_untrained_model_and_rejects_bad_arguments(coco8_yaml) -> None:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
    scores = evaluate_detector(model, coco8_yaml, imgsz=64, batch=4)
    assert scores["images"] == 4 and 0.0 <= scores["map50_95"] <= scores["map50"] <= 1.0
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="imgsz=8"):
        evaluate_detector(model, coco8_yaml, imgsz=8)
    with pytest.raises(ValueError, match="split='test'"):
        evaluate_detector(model, coco8_yaml, imgsz=64, split="test")
