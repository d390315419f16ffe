"""Ground truth as users have it: class maps with the model's classes, binary masks, or
instance maps of nuclei without classes (MoNuSeg, TNBC, most labs' own annotations).

A multi-class prediction is scored against nucleus-only ground truth with its classes merged
into one "nucleus" class, and the report says so; per-class rows would otherwise compare
'inflammatory' with an annotation that never named a class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..nuclei.watershed import InstanceSettings
from .report import NUCLEUS_CLASSES, evaluate_maps
from .semantic import MetricsInputError


@dataclass
class GroundTruth:
    """A ground-truth class map, its class names, and its instances where it has them."""

    class_map: np.ndarray
    classes: list[str]
    instances: np.ndarray | None = None
    reading: str = ""  # how an unnamed label map was read (said in the report: the values alone can mislead)

    @property
    def nucleus_only(self) -> bool:
        return len(self.classes) == 2


def ground_truth_from_label_map(labels: np.ndarray, model_classes: list[str]) -> GroundTruth:
    """Read one annotated label map as what it most likely is, and say how it was read.

    * Every id one connected blob, and more than one id: an instance map (every id one
      nucleus), nucleus-only — a class map's classes each cover many nuclei. With at least 10 ids
      (and more than the model's classes), a few ids in more than one piece (one, or one in
      ten: a stray pixel of an annotated polygon, as in 3 of MoNuSeg's 13 maps) still make an
      instance map, each id one nucleus as drawn.
    * Values within the model's class ids: a class map with the model's classes (one class
      present is still a class map, unless its value is 1, 255 or beyond the classes: a mask).
    * One value other than 0: a binary nucleus mask.
    * Otherwise (classes the model does not have): a class map of other classes, scored as
      nucleus vs background.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise MetricsInputError(f"Ground truth must be a 2-D map of integer labels, got {labels.dtype} {labels.shape}.")
    if labels.size and labels.min() < 0:
        raise MetricsInputError("Ground truth holds negative labels.")
    values = np.unique(labels)
    foreground = values[values > 0]
    nucleus = (labels > 0).astype(np.uint8)
    multi_class = len(model_classes) > 2
    if foreground.size == 1:
        value = int(foreground[0])
        if multi_class and 1 < value < len(model_classes):  # e.g. only spindle nuclei on this patch
            return GroundTruth(labels.astype(np.uint8), list(model_classes),
                               reading=f"a class map with the model's classes (only '{model_classes[value]}' present)")
        return GroundTruth(nucleus, list(NUCLEUS_CLASSES), reading="a binary nucleus mask")
    if foreground.size == 0:
        return GroundTruth(nucleus, list(NUCLEUS_CLASSES), reading="an empty map (no nucleus annotated)")
    in_pieces = _ids_in_pieces(labels)
    # a few ids in pieces only among many: a class map of 5 classes, one in pieces, stays a class map
    if in_pieces == 0 or (foreground.size >= max(10, len(model_classes)) and in_pieces <= max(1, foreground.size // 10)):
        pieces = f"; {in_pieces} of its {foreground.size} ids in more than one piece" if in_pieces else ""
        return GroundTruth(nucleus, list(NUCLEUS_CLASSES), labels.astype(np.int64),
                           reading=f"an instance map (every id one nucleus, no classes{pieces})")
    if int(values.max()) < len(model_classes):
        return GroundTruth(labels.astype(np.uint8), list(model_classes), reading="a class map with the model's classes")
    return GroundTruth(nucleus, list(NUCLEUS_CLASSES),
                       reading=f"a class map of classes the model does not have (ids up to {int(values.max())}): "
                               "nucleus vs background")


def _ids_in_pieces(labels: np.ndarray) -> int:
    """How many ids > 0 are more than one 8-connected blob (an instance map's nuclei are one blob
    each; a class map's classes each hold many nuclei). Read within each id's bounding box: no
    pass over the image per id."""
    from scipy import ndimage as ndi

    if int(labels.max(initial=0)) > 4 * labels.size ** 0.5 + 1024:  # sparse, huge ids: a table per id would not fit
        from skimage.segmentation import relabel_sequential

        labels = relabel_sequential(labels)[0]
    structure = np.ones((3, 3), bool)
    return sum(1 for index, box in enumerate(ndi.find_objects(labels), start=1)
               if box is not None and ndi.label(labels[box] == index, structure)[1] > 1)


def merged_classes(truth: GroundTruth, because: str) -> GroundTruth:
    """``truth`` as nucleus vs background, for a prediction that names no nucleus classes."""
    return replace(truth, class_map=(truth.class_map > 0).astype(np.uint8), classes=list(NUCLEUS_CLASSES),
                   reading=f"nucleus vs background: its classes {truth.classes[1:]} merged into 'nucleus', as {because}")


def _few(names) -> str:
    """Class names for a message: a map's 200 numbered classes would fill the panel."""
    names = list(names)
    return str(names) if len(names) <= 8 else f"{names[:4]} ... ({len(names)} classes)"


def as_scored(pred: np.ndarray, pred_classes: list[str], truth: GroundTruth) -> tuple[np.ndarray, GroundTruth, list[str], str]:
    """The prediction, ground truth and class names as they are scored, and why they were merged
    (empty if not): the truth's classes merged where the prediction names none (a nucleus-only
    model's), the prediction's where the truth names none, both where they name others (PanNuke's
    five classes against a CoNSeP model's: nuclei are still nuclei, per class they cannot be)."""
    pred = np.asarray(pred)
    if len(pred_classes) == 2 and not truth.nucleus_only:
        truth = merged_classes(truth, because="the prediction names none (a nucleus-only model's)")
    why = ""
    if not truth.nucleus_only and truth.classes != list(pred_classes):
        why = (f"The ground truth's classes {_few(truth.classes[1:])} are not the prediction's "
               f"{_few(pred_classes[1:])}: both were merged into 'nucleus' (nucleus vs background); per-class "
               "scores need a ground truth with the model's classes.")
        truth = replace(merged_classes(truth, because="the prediction's classes are others"), reading=truth.reading)
    elif truth.nucleus_only and len(pred_classes) > 2:
        why = ("The ground truth names no nucleus classes: the prediction's classes were merged into "
               "'nucleus' (nucleus vs background).")
    if truth.nucleus_only and len(pred_classes) > 2:
        pred = (pred > 0).astype(np.uint8)
    return pred, truth, list(truth.classes), why


def compare_to_ground_truth(pred: np.ndarray, pred_classes: list[str], truth: GroundTruth,
                            pred_instances: np.ndarray | None = None,
                            instance_settings: InstanceSettings | None = None) -> dict:
    """``evaluate_maps`` of a prediction against ``truth``, classes merged as ``as_scored`` says
    (``report["classes_merged"]``: the prediction's were; ``report["note"]``: why)."""
    scored, truth, classes, why = as_scored(pred, pred_classes, truth)
    report = evaluate_maps(truth.class_map, scored, classes, gt_instances=truth.instances,
                           pred_instances=pred_instances, instance_settings=instance_settings, truth_classes=classes)
    report["classes_merged"] = bool(why)
    read = f"The ground truth was read as {truth.reading}. " if truth.reading else ""
    report["note"] = (read + why).strip()
    return report
