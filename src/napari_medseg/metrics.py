"""Semantic segmentation metrics from one confusion matrix.

The matrix is built in a single pass (``np.bincount`` of ``gt * C + pred``); every
number below is a cheap reduction of it. Conventions, stated once:

* per class c: IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), precision = TP/(TP+FP),
  recall = TP/(TP+FN). A ratio whose denominator is 0 is NaN ("undefined": the class
  is absent from both maps, or predicted nowhere for precision) and is left out of means.
* ``miou`` / ``mean_dice`` average the foreground classes (background excluded) over the
  classes that are defined; ``pixel_accuracy`` = trace / total, over all classes.
* ``binary_dice`` merges all foreground classes into one (nucleus vs background).
* Aggregation over images: add the confusion matrices, then compute (pooled, not a
  mean of per-image scores).
"""

from __future__ import annotations

import numpy as np


class MetricsInputError(ValueError):
    """Prediction and ground truth cannot be compared as given."""


def check_label_pair(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise MetricsInputError(f"Ground truth has shape {gt.shape} but the prediction has {pred.shape}; they must match.")
    for name, arr in (("ground truth", gt), ("prediction", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise MetricsInputError(f"The {name} must hold integer class ids, not {arr.dtype}.")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise MetricsInputError(
                f"The {name} holds class id {int(arr.max()) if arr.max() >= num_classes else int(arr.min())}, "
                f"outside 0..{num_classes - 1} for {num_classes} classes."
            )
    return gt, pred


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of pixels of true class i predicted as class j (int64)."""
    gt, pred = check_label_pair(gt, pred, num_classes)
    flat = gt.ravel().astype(np.int64) * num_classes + pred.ravel().astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def semantic_metrics(cm: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Per-class and summary metrics from a confusion matrix (see module docstring)."""
    cm = np.asarray(cm, dtype=np.int64)
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise MetricsInputError(f"{len(names)} class names for a {n}x{n} confusion matrix.")
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    iou = _ratio(tp, tp + fp + fn)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    per_class = {
        names[c]: {
            "iou": float(iou[c]), "dice": float(dice[c]), "precision": float(precision[c]),
            "recall": float(recall[c]), "tp": int(tp[c]), "fp": int(fp[c]), "fn": int(fn[c]),
            "gt_pixels": int(cm[c].sum()), "pred_pixels": int(cm[:, c].sum()),
        }
        for c in range(n)
    }
    total = int(cm.sum())
    fg_tp = int(cm[1:, 1:].sum())
    fg_fp = int(cm[0, 1:].sum())
    fg_fn = int(cm[1:, 0].sum())
    binary_dice = _ratio(2 * fg_tp, 2 * fg_tp + fg_fp + fg_fn)
    accuracy = _ratio(tp.sum(), total)
    return {
        "per_class": per_class,
        "pixel_accuracy": float(accuracy),
        "pixel_error": float(1 - accuracy) if total else float("nan"),
        "miou": _nanmean(iou[1:]),
        "mean_dice": _nanmean(dice[1:]),
        "binary_dice": float(binary_dice),
        "binary_iou": float(_ratio(fg_tp, fg_tp + fg_fp + fg_fn)),
        "pixels": total,
        "aggregation": "pooled confusion matrix; means over defined foreground classes",
    }


def evaluate_pair(gt: np.ndarray, pred: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of one prediction against its ground truth."""
    return semantic_metrics(confusion_matrix(gt, pred, len(class_names)), class_names)
