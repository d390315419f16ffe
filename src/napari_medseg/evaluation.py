"""Evaluate a folder of predicted label maps against a dataset folder of ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io.dataset import DatasetError, open_dataset
from .io.images import read_label_map
from .metrics import confusion_matrix, semantic_metrics


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path) -> dict:
    """Per-class, per-image and pooled metrics (see ``napari_medseg.metrics`` for the conventions)."""
    gt = open_dataset(gt_dir, require_labels=True)
    pred_dir = Path(pred_dir)
    labels_dir = pred_dir / "labels" if (pred_dir / "labels").is_dir() else pred_dir
    pred_classes_file = pred_dir / "classes.json"
    if pred_classes_file.is_file():
        pred_classes = json.loads(pred_classes_file.read_text()).get("classes", [])
        if pred_classes and pred_classes != gt.classes:
            raise DatasetError(
                f"The prediction's classes {pred_classes} differ from the ground truth's {gt.classes}; "
                "evaluate with a model trained on the same classes."
            )
    n = len(gt.classes)
    total = np.zeros((n, n), np.int64)
    per_image = {}
    missing = [s for s in gt.stems if not (labels_dir / f"{s}.tif").is_file()]
    if len(missing) == len(gt.stems):
        raise DatasetError(f"{labels_dir} holds no prediction for any of the {len(gt.stems)} ground-truth images.")
    if missing:
        raise DatasetError(f"{labels_dir} lacks predictions for {len(missing)} image(s): {', '.join(missing[:5])}")
    for stem in gt.stems:
        truth = gt.load(stem).labels
        pred = read_label_map(labels_dir / f"{stem}.tif")
        cm = confusion_matrix(truth, pred, n)
        total += cm
        m = semantic_metrics(cm, gt.classes)
        per_image[stem] = {"dice": m["binary_dice"], "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"]}
    pooled = semantic_metrics(total, gt.classes)
    return {
        "overall": {
            "dice": pooled["binary_dice"],
            "miou": pooled["miou"],
            "mean_dice": pooled["mean_dice"],
            "pixel_accuracy": pooled["pixel_accuracy"],
        },
        "per_class": pooled["per_class"],
        "per_image": per_image,
        "classes": gt.classes,
        "images": len(gt.stems),
        "aggregation": "pooled over images; 'dice' merges all foreground classes; mIoU/mean Dice average foreground classes",
    }
