"""Per-pixel error maps of a prediction against ground truth, for the viewer's error overlay."""

from __future__ import annotations

import numpy as np

from .semantic import check_label_pair

# Values of an error map. 0 = nothing to show (true negative).
TP, FP, FN, WRONG_CLASS = 1, 2, 3, 4
ERROR_NAMES = {TP: "true positive", FP: "false positive", FN: "false negative", WRONG_CLASS: "wrong class"}
# Colour-blind-safe: bluish green, vermilion, sky blue, reddish purple (Okabe-Ito).
ERROR_COLORS = {TP: (0, 158, 115), FP: (213, 94, 0), FN: (86, 180, 233), WRONG_CLASS: (204, 121, 167)}


def error_map(gt: np.ndarray, pred: np.ndarray, num_classes: int, class_id: int | None = None) -> np.ndarray:
    """uint8 map of TP / FP / FN pixels.

    For one class ``c``: TP where both are ``c``, FP where only the prediction is ``c``,
    FN where only the ground truth is ``c``. For all classes (``class_id=None``): TP where
    both agree on a nucleus class, FP where a nucleus is predicted on background, FN where
    a nucleus is missed, and WRONG_CLASS where both see a nucleus but disagree on its class.
    """
    gt, pred = check_label_pair(gt, pred, num_classes)
    out = np.zeros(gt.shape, np.uint8)
    if class_id is not None:
        if not 0 < class_id < num_classes:
            raise ValueError(f"class_id {class_id} is not a foreground class (1..{num_classes - 1}).")
        g, p = gt == class_id, pred == class_id
        out[g & p] = TP
        out[p & ~g] = FP
        out[g & ~p] = FN
        return out
    g, p = gt > 0, pred > 0
    out[g & p & (gt == pred)] = TP
    out[p & ~g] = FP
    out[g & ~p] = FN
    out[g & p & (gt != pred)] = WRONG_CLASS
    return out


def error_counts(errors: np.ndarray) -> dict[str, int]:
    counts = np.bincount(errors.ravel(), minlength=5)
    return {name: int(counts[value]) for value, name in ERROR_NAMES.items()}
