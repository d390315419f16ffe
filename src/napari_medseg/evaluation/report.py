"""Evaluate predictions against ground truth: one pair of maps, or whole folders.

Semantic numbers come from pooled confusion matrices (``napari_medseg.evaluation.semantic``),
instance numbers (PQ family, F1, AJI) from per-image contingency tables
(``napari_medseg.evaluation.instance``). Where a side has no instance map, instances are
derived from its class map with ``semantic_to_instances``.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from .instance import aggregate_instance_stats, image_instance_stats
from ..nuclei.watershed import InstanceSettings, semantic_to_instances
from ..io.dataset import CLASSES_FILE, DatasetError, open_dataset, read_classes
from ..io.images import read_label_map
from .semantic import MetricsInputError, check_label_pair, confusion_matrix, semantic_metrics
from ..wording import counted

NUCLEUS_CLASSES = ["background", "nucleus"]  # what is scored where one side names no nucleus classes
AGGREGATION = {
    "semantic": "pooled confusion matrix over all pixels of all images",
    "nucleus_dice": "all nucleus classes merged vs background, pooled",
    "miou": "mean over nucleus classes (background excluded) of pooled IoU",
    "bpq": "PanNuke: binary PQ per image (images without nuclei skipped), averaged over all images",
    "mpq": "PanNuke: per image, PQ of each class present in its ground truth, averaged over classes then all images "
           "(PanNuke's published numbers average the images of each tissue type, then the tissues: not done here)",
    "mpq_plus": "CoNIC: tp/fp/fn/IoU summed per class over all images, PQ per class, averaged over classes",
    "f1": "binary detection F1 at IoU > 0.5, pooled",
    "aji": "aggregated Jaccard index, pooled (sum of intersections / sum of unions)",
    "per_class.iou / dice / precision / recall / tp / fp / fn": "pixels, pooled confusion matrix",
    "per_class.pq": "PanNuke: the class's PQ averaged over the images whose ground truth has it",
    "per_class.pq_plus / f1 / gt_objects / pred_objects": "nuclei, tp/fp/fn summed over all images (CoNIC)",
}
# the watershed settings each kind of derived nuclei uses (a ground truth's keep every nucleus
# and hole: ground_truth_settings)
PREDICTION_WATERSHED = ("min_distance", "sigma", "min_size", "fill_holes")
GROUND_TRUTH_WATERSHED = ("min_distance", "sigma")


def ground_truth_settings(settings: InstanceSettings | None) -> InstanceSettings:
    """How nuclei are cut from a ground truth that has no instance map: as the prediction's
    (the same watershed), but every annotated nucleus kept, however small, and its holes left as
    drawn: dropping specks and filling holes is the model's clean-up, not the annotator's (at 20x
    most CoNSeP nuclei are under the model's 45 px: the truth had lost them)."""
    return replace(settings or InstanceSettings(), min_size=0, fill_holes=False)


def _instances_for(class_map: np.ndarray, instances: np.ndarray | None, settings: InstanceSettings | None,
                   side: str) -> np.ndarray:
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != class_map.shape:  # which side: a folder pair has two instance maps
            raise MetricsInputError(f"The {side} instance map has shape {instances.shape} but its class map "
                                    f"{class_map.shape}; they must match.")
        return instances
    return semantic_to_instances(class_map, settings)


def _undefined_as_null(value):
    """NaN ('undefined': a zero denominator) as JSON null: NaN is not JSON, and jq, browsers and
    most readers other than Python's refuse the whole file for it."""
    if isinstance(value, dict):
        return {key: _undefined_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_undefined_as_null(item) for item in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, np.generic):
        return _undefined_as_null(value.item())
    return value


def report_json(report: dict) -> str:
    """A report as the JSON ``medseg evaluate --json`` and the Metrics panel's export write."""
    return json.dumps(_undefined_as_null(report), indent=1, allow_nan=False)


def _some(names: list[str], most: int = 3) -> str:
    """The first ``most`` names, and '...' where there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def predictions_without_truth(labels_dir: Path, stems: list[str]) -> list[str]:
    """Stems of the class maps in ``labels_dir`` that no ground-truth image has: never scored, so
    said (a folder of another set's predictions, or renamed files, had gone unnoticed)."""
    known = set(stems)
    return sorted(p.stem for p in labels_dir.glob("*.tif")
                  if p.is_file() and not p.name.startswith(".") and p.stem not in known)


def _without_truth_words(unscored: list[str], labels_dir: Path, gt_dir) -> str:
    """'2 predictions in PRED have no ground truth in GT (a, b)'; empty for none."""
    if not unscored:
        return ""
    verb = "has" if len(unscored) == 1 else "have"
    return (f"{counted(len(unscored), 'prediction')} in {labels_dir} {verb} no ground truth in {gt_dir} "
            f"({_some(unscored)})")


def _instances_source(read: int, images: int, folder: Path) -> str:
    derived = "derived from the class maps (watershed)"
    if read == images:
        return f"instance maps in {folder}"
    return derived if read == 0 else f"instance maps in {folder} for {read} of {images} images, the others {derived}"


def _unused_settings_note(settings: InstanceSettings | None, pred_derived: bool, gt_derived: bool) -> str:
    """Say which watershed settings, changed from the defaults, nothing used: they apply only to
    nuclei derived from class maps, and a folder with instance maps had silently ignored them."""
    if settings is None:
        return ""
    defaults = InstanceSettings()
    used = set(PREDICTION_WATERSHED if pred_derived else ()) | set(GROUND_TRUTH_WATERSHED if gt_derived else ())
    unused = [f"{f.name} {getattr(settings, f.name)}" for f in fields(settings)
              if getattr(settings, f.name) != getattr(defaults, f.name) and f.name not in used]
    if not unused:
        return ""
    read = "the prediction's nuclei were" if gt_derived else "all nuclei were"  # pred_derived uses them all
    return (f"The watershed settings {', '.join(unused)} were not used: they cut nuclei from class maps, and "
            f"{read} read from instance maps.")


class PairEvaluation:
    """Accumulates image pairs; ``report()`` gives overall, per-class and per-image numbers.

    ``class_names`` are the prediction's classes, and the ground truth's unless ``truth_classes``
    names others: nucleus-only ground truth (two names: MoNuSeg, TNBC, a lab's masks) against a
    multi-class prediction is scored nucleus vs background, the prediction's classes merged into
    'nucleus', and a nucleus-only prediction against classed truth the same, the truth's merged;
    the report's ``classes_merged`` and ``note`` say so. Other differing classes are refused.
    """

    def __init__(self, class_names: list[str], instance_settings: InstanceSettings | None = None,
                 truth_classes: list[str] | None = None):
        if isinstance(truth_classes, str) or isinstance(class_names, str):  # list('nucleus') is its letters
            raise MetricsInputError("Class names are a list of names, e.g. truth_classes=['background', 'nucleus'].")
        pred_classes = list(class_names)
        truth = pred_classes if truth_classes is None else list(truth_classes)
        # named nucleus-only truth: any non-zero value is a nucleus (a 0 / 255 mask, an instance map)
        self.truth_is_mask = truth_classes is not None and len(truth) == 2
        self.merge_prediction = len(truth) == 2 and len(pred_classes) > 2
        self.merge_truth = len(pred_classes) == 2 and len(truth) > 2
        both_binary = len(truth) == 2 == len(pred_classes)  # nucleus vs background, whatever the names
        if truth != pred_classes and not (both_binary or self.merge_prediction or self.merge_truth):
            raise MetricsInputError(f"The prediction's classes {pred_classes} differ from the ground truth's {truth}: "
                                    "per-class scores need the same classes (nucleus-only truth is merged).")
        self.merged_names = (pred_classes if self.merge_prediction else truth)[1:]
        self.truth_named = truth_classes is not None  # else the truth's classes are assumed: said where doubtful
        self.class_names = list(NUCLEUS_CLASSES) if self.merge_prediction or self.merge_truth else pred_classes
        self.settings = instance_settings
        self.cm = np.zeros((len(self.class_names), len(self.class_names)), np.int64)
        self.instance_stats = []
        self.per_image: dict[str, dict] = {}

    def add(self, name: str, gt: np.ndarray, pred: np.ndarray, gt_instances: np.ndarray | None = None,
            pred_instances: np.ndarray | None = None) -> dict:
        n = len(self.class_names)
        if self.merge_prediction:
            pred = (np.asarray(pred) > 0).astype(np.uint8)
        if self.merge_truth or self.truth_is_mask:
            gt = (np.asarray(gt) > 0).astype(np.uint8)
        gt, pred = check_label_pair(gt, pred, n)
        cm = confusion_matrix(gt, pred, n)
        stats = image_instance_stats(
            _instances_for(gt, gt_instances, ground_truth_settings(self.settings), "ground-truth"), gt,
            _instances_for(pred, pred_instances, self.settings, "predicted"), pred, n,
        )
        self.cm += cm
        self.instance_stats.append(stats)
        sem = semantic_metrics(cm, self.class_names)
        inst = aggregate_instance_stats([stats], self.class_names)
        self.per_image[name] = {
            "nucleus_dice": sem["nucleus_dice"], "miou": sem["miou"], "pixel_accuracy": sem["pixel_accuracy"],
            "bpq": inst["bpq"], "mpq": inst["mpq"], "f1": inst["f1"], "aji": inst["aji"],
        }
        return self.per_image[name]

    def report(self) -> dict:
        sem = semantic_metrics(self.cm, self.class_names)
        inst = aggregate_instance_stats(self.instance_stats, self.class_names)
        per_class = {}
        for name in self.class_names:
            row = dict(sem["per_class"][name])
            extra = inst["per_class"].get(name, {})
            row["pq"] = extra.get("pq", float("nan"))
            row["pq_plus"] = extra.get("pq_plus", float("nan"))
            row["f1"] = extra.get("f1", float("nan"))
            row["gt_objects"] = int(extra.get("tp", 0) + extra.get("fn", 0))
            row["pred_objects"] = int(extra.get("tp", 0) + extra.get("fp", 0))
            per_class[name] = row
        report = {
            "overall": {
                "nucleus_dice": sem["nucleus_dice"], "miou": sem["miou"], "mean_dice": sem["mean_dice"],
                "pixel_accuracy": sem["pixel_accuracy"], "pixel_error": sem["pixel_error"],
                "bpq": inst["bpq"], "mpq": inst["mpq"], "mpq_plus": inst["mpq_plus"], "f1": inst["f1"],
                "aji": inst["aji"],
            },
            "per_class": per_class,
            "per_image": self.per_image,
            "classes": self.class_names,
            "images": len(self.per_image),
            "aggregation": AGGREGATION,
            "classes_merged": self.merge_prediction or self.merge_truth,
        }
        note = self._merge_note() or self._mask_note()
        if note:
            report["note"] = note
        return report

    def _merge_note(self) -> str:
        if self.merge_prediction:
            return (f"The ground truth is nucleus-only (one class, 'nucleus'): the prediction's classes "
                    f"{self.merged_names} were merged into 'nucleus' (nucleus vs background).")
        if self.merge_truth:
            return (f"The prediction is nucleus-only (a nucleus-only model's): the ground truth's classes "
                    f"{self.merged_names} were merged into 'nucleus' (nucleus vs background).")
        return ""

    def _mask_note(self) -> str:
        """A nucleus mask scored as if its 1 were the first class: TNBC against the 5-class default
        had given mIoU 0.006 for nucleus Dice 0.85 without a word."""
        if self.truth_named:
            return ""
        truth_ids = np.flatnonzero(self.cm.sum(axis=1))
        predicted_ids = np.flatnonzero(self.cm.sum(axis=0))
        if len(self.class_names) > 2 and truth_ids.size and truth_ids.max() == 1 and predicted_ids.max(initial=0) > 1:
            return (f"The ground truth holds only class 1 ('{self.class_names[1]}') where the prediction names "
                    f"{len(self.class_names) - 1} classes: if it is a nucleus mask, score it nucleus vs background "
                    "(truth_classes=['background', 'nucleus']).")
        return ""


def evaluate_maps(gt: np.ndarray, pred: np.ndarray, class_names: list[str], gt_instances=None, pred_instances=None,
                  instance_settings: InstanceSettings | None = None, truth_classes: list[str] | None = None) -> dict:
    """Everything for one image pair (as ``PairEvaluation``: ``class_names`` the prediction's,
    ``truth_classes`` the ground truth's where they differ, e.g. a nucleus-only mask's)."""
    evaluation = PairEvaluation(class_names, instance_settings, truth_classes)
    evaluation.add("image", gt, pred, gt_instances, pred_instances)
    return evaluation.report()


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, instance_settings: InstanceSettings | None = None,
                     progress=None) -> dict:
    """Compare ``pred_dir/labels`` (and ``pred_dir/instances`` if present) with a ground-truth dataset folder."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"The prediction folder {pred_dir} does not exist"
                           + (" (it is a file: give the folder medseg predict wrote)." if pred_dir.exists() else "."))
    gt = open_dataset(gt_dir, require_labels=True)
    labels_dir = pred_dir / "labels" if (pred_dir / "labels").is_dir() else pred_dir
    instances_dir = pred_dir / "instances"
    named = (pred_dir / CLASSES_FILE).is_file()
    # a classes.json it cannot read is refused, naming it; without one, the truth's classes are taken
    pred_classes = read_classes(pred_dir)[0] if named else gt.classes
    try:  # nucleus-only truth or prediction: scored nucleus vs background, as the viewer and the browser do
        evaluation = PairEvaluation(pred_classes, instance_settings, gt.classes)
    except MetricsInputError:
        raise DatasetError(f"The prediction's classes {pred_classes} differ from the ground truth's {gt.classes}; "
                           "evaluate with a model trained on the same classes.") from None
    missing = [s for s in gt.stems if not (labels_dir / f"{s}.tif").is_file()]
    unscored = predictions_without_truth(labels_dir, gt.stems)
    # said with a refusal too: names that differ from the truth's are a likelier cause than a missing run
    without_truth = _without_truth_words(unscored, labels_dir, gt_dir)
    they = "it was" if len(unscored) == 1 else "they were"
    elsewhere = f"\n{without_truth}: is {gt_dir} the folder {they} predicted from?" if unscored else ""
    if len(missing) == len(gt.stems):
        stems = set(gt.stems)
        others = sorted({p.name for p in labels_dir.iterdir() if p.stem in stems and p.is_file()})
        found = (f" ({_some(others)} there are not .tif)" if others
                 else f" (looked for <stem>.tif, e.g. {gt.stems[0]}.tif)")
        n = len(gt.stems)
        which = "the one ground-truth image" if n == 1 else f"any of the {n} ground-truth images"
        raise DatasetError(f"{labels_dir} holds no prediction for {which}{found}: class maps as <stem>.tif, as "
                           f"medseg predict writes them.{elsewhere}")
    if missing:
        raise DatasetError(f"{labels_dir} lacks predictions for {counted(len(missing), 'image')}: "
                           f"{_some(missing, 5)}; predict every image of the ground truth's folder: "
                           f"medseg predict {gt_dir} --out {pred_dir}{elsewhere}")
    pred_read = gt_read = 0
    for i, stem in enumerate(gt.stems, 1):
        sample = gt.load(stem)
        pred = read_label_map(labels_dir / f"{stem}.tif")
        inst_file = instances_dir / f"{stem}.tif"
        pred_instances = read_label_map(inst_file) if inst_file.is_file() else None
        pred_read += pred_instances is not None
        gt_read += sample.instances is not None
        try:
            evaluation.add(stem, sample.labels, pred, sample.instances, pred_instances)
        except MetricsInputError as exc:
            unnamed = ("" if named else f" ({pred_dir} has no {CLASSES_FILE}, so the prediction was taken to have "
                       f"the ground truth's classes; medseg predict writes one naming the model's)")
            raise MetricsInputError(f"{stem}: {exc}{unnamed}") from exc
        if progress is not None:
            progress(i, len(gt.stems))
    report = evaluation.report()
    report["predictions_without_ground_truth"] = unscored
    n = len(gt.stems)
    report["instances"] = {"prediction": _instances_source(pred_read, n, instances_dir),
                           "ground_truth": _instances_source(gt_read, n, Path(gt_dir) / "instances")}
    notes = [report.get("note", ""), _unused_settings_note(instance_settings, pred_read < n, gt_read < n)]
    notes += [f"{without_truth}: not scored." if unscored else ""]
    if any(notes):
        report["note"] = " ".join(note for note in notes if note)
    return report
