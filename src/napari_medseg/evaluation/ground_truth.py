"""Ground truth as users have it: class maps with the model's classes, binary masks, or
instance maps of nuclei without classes (MoNuSeg, TNBC, most labs' own annotations).

A multi-class prediction is scored against nucleus-only ground truth with its classes merged
into one "nucleus" class, and the report says so; per-class rows would otherwise compare
'inflammatory' with an annotation that never named a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..nuclei.watershed import InstanceSettings
from .report import evaluate_maps
from .semantic import MetricsInputError

NUCLEUS_CLASSES = ["background", "nucleus"]


@dataclass
class GroundTruth:
    """A ground-truth class map, its class names, and its instances where it has them."""

    class_map: np.ndarray
    classes: list[str]
    instances: np.ndarray | None = None

    @property
    def nucleus_only(self) -> bool:
        return len(self.classes) == 2


def ground_truth_from_label_map(labels: np.ndarray, model_classes: list[str]) -> GroundTruth:
    """Read one annotated label map as what it most likely is.

    Values within the model's class ids, and no more of them than it has classes: a class map
    with the model's classes. Two values (0 and any other): a binary nucleus mask. More values
    than the model has classes: an instance map (every id one nucleus), nucleus-only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise MetricsInputError(f"Ground truth must be a 2-D map of integer labels, got {labels.dtype} {labels.shape}.")
    if labels.size and labels.min() < 0:
        raise MetricsInputError("Ground truth holds negative labels.")
    values = np.unique(labels)
    foreground = values[values > 0]
    if foreground.size <= 1:  # a binary mask (0/1, 0/255, ...), or nothing annotated
        return GroundTruth((labels > 0).astype(np.uint8), list(NUCLEUS_CLASSES))
    if int(values.max()) < len(model_classes):
        return GroundTruth(labels.astype(np.uint8), list(model_classes))
    return GroundTruth((labels > 0).astype(np.uint8), list(NUCLEUS_CLASSES), labels.astype(np.int64))


def compare_to_ground_truth(pred: np.ndarray, pred_classes: list[str], truth: GroundTruth,
                            pred_instances: np.ndarray | None = None,
                            instance_settings: InstanceSettings | None = None) -> dict:
    """``evaluate_maps`` of a prediction against ``truth``, classes merged when the truth names
    none (``report["classes_merged"]``, ``report["note"]``)."""
    pred = np.asarray(pred)
    merged = truth.nucleus_only and len(pred_classes) > 2
    if merged:
        pred, classes = (pred > 0).astype(np.uint8), list(NUCLEUS_CLASSES)
    elif truth.nucleus_only or truth.classes == list(pred_classes):
        classes = list(truth.classes)
    else:
        raise MetricsInputError(f"The ground truth's classes {truth.classes} differ from the prediction's "
                                f"{list(pred_classes)}.")
    report = evaluate_maps(truth.class_map, pred, classes, gt_instances=truth.instances,
                           pred_instances=pred_instances, instance_settings=instance_settings)
    report["classes_merged"] = merged
    report["note"] = ("The ground truth names no nucleus classes: the prediction's classes were merged into "
                      "'nucleus' (nucleus vs background)." if merged else "")
    return report
