"""Semantic segmentation metrics from one confusion matrix.

The matrix is built in a single pass (``np.bincount`` of ``gt * C + pred``); every
number below is a cheap reduction of it. Conventions, stated once:

* per class c: IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), precision = TP/(TP+FP),
  recall = TP/(TP+FN). A ratio whose denominator is 0 is NaN ("undefined": the class
  is absent from both maps, or predicted nowhere for precision) and is left out of means.
* ``miou`` / ``mean_dice`` average the foreground classes (background excluded) over the
  classes that are defined; ``pixel_accuracy`` = trace / total, over all classes.
* ``nucleus_dice`` (and ``nucleus_iou``) merge all foreground classes into one: nucleus vs
  background. It is *the* Dice this project reports (CLI, widgets, checkpoints, README);
  ``mean_dice`` is the mean of the per-class Dice, called "mean class Dice" wherever shown.
* Aggregation over images: add the confusion matrices, then compute (pooled, not a
  mean of per-image scores).
"""

from __future__ import annotations

import numpy as np

from ..errors import MedsegError


class MetricsInputError(MedsegError, ValueError):
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
    nucleus_dice = _ratio(2 * fg_tp, 2 * fg_tp + fg_fp + fg_fn)
    accuracy = _ratio(tp.sum(), total)
    return {
        "per_class": per_class,
        "pixel_accuracy": float(accuracy),
        "pixel_error": float(1 - accuracy) if total else float("nan"),
        "miou": _nanmean(iou[1:]),
        "mean_dice": _nanmean(dice[1:]),
        "nucleus_dice": float(nucleus_dice),
        "nucleus_iou": float(_ratio(fg_tp, fg_tp + fg_fp + fg_fn)),
        "pixels": total,
        "aggregation": "pooled confusion matrix; means over defined foreground classes",
    }


def evaluate_pair(gt: np.ndarray, pred: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of one prediction against its ground truth."""
    return semantic_metrics(confusion_matrix(gt, pred, len(class_names)), class_names)


# -- binary mode: a probability map and a threshold ---------------------------------------------
def binary_confusion(gt_mask: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2x2 confusion matrix of ``prob > threshold`` against a boolean ground truth."""
    gt_mask, prob = np.asarray(gt_mask), np.asarray(prob, dtype=np.float64)
    if gt_mask.shape != prob.shape:
        raise MetricsInputError(f"Ground truth has shape {gt_mask.shape} but the probabilities have {prob.shape}.")
    if np.isnan(prob).any():
        raise MetricsInputError("The probability map contains NaN.")
    return confusion_matrix((gt_mask > 0).astype(np.uint8), (prob > threshold).astype(np.uint8), 2)


def threshold_search(pairs, thresholds=None, metric: str = "dice", bins: int = 1000) -> dict:
    """Pick the threshold that maximises a pooled binary metric over validation pairs.

    ``pairs`` yields ``(gt_mask, prob)``. One pass: per image, histograms of the
    probabilities of nucleus and background pixels; cumulative sums then give TP/FP/FN at
    every threshold (resolution 1/bins) without re-thresholding any image.
    """
    if metric not in ("dice", "iou"):
        raise ValueError(f"metric must be 'dice' or 'iou', not '{metric}'.")
    edges = np.linspace(0.0, 1.0, bins + 1)
    fg_hist = np.zeros(bins, np.int64)
    bg_hist = np.zeros(bins, np.int64)
    for gt_mask, prob in pairs:
        gt_mask, prob = np.asarray(gt_mask) > 0, np.asarray(prob, np.float64)
        if gt_mask.shape != prob.shape:
            raise MetricsInputError(f"Ground truth {gt_mask.shape} and probabilities {prob.shape} differ in shape.")
        if prob.size and (np.isnan(prob).any() or prob.min() < 0 or prob.max() > 1):
            raise MetricsInputError("Probabilities must lie in [0, 1] (no NaN).")
        # bin k holds p in [k/bins, (k+1)/bins); p = 1 goes to the last bin
        index = np.minimum((prob * bins).astype(np.int64), bins - 1)
        fg_hist += np.bincount(index[gt_mask], minlength=bins)
        bg_hist += np.bincount(index[~gt_mask], minlength=bins)
    # predicting "nucleus" for p >= edges[k]: counts of bins k.. (suffix sums)
    tp = np.cumsum(fg_hist[::-1])[::-1]
    fp = np.cumsum(bg_hist[::-1])[::-1]
    fn = fg_hist.sum() - tp
    score = _ratio(2 * tp, 2 * tp + fp + fn) if metric == "dice" else _ratio(tp, tp + fp + fn)
    candidates = np.arange(bins) if thresholds is None else np.clip(
        np.round(np.asarray(thresholds) * bins).astype(int), 0, bins - 1)
    valid = candidates[~np.isnan(score[candidates])]
    if valid.size == 0:
        raise MetricsInputError("No threshold is defined: the validation data holds no pixels.")
    best = valid[np.argmax(score[valid])]
    return {"threshold": float(edges[best]), metric: float(score[best]),
            "curve": {"thresholds": edges[candidates].tolist(), metric: score[candidates].tolist()}}
