"""A model and the classical baseline scored on the same labelled images (``benchmarks/accuracy.py``,
``benchmarks/compare_models.py``).

The model runs tiled (``Segmenter``); its instances come from its class map by a marker
watershed, seeded by its distance head where it has one (``Segmenter.segment_nuclei``). The
classical baseline (``nuclei.classical``: haematoxylin deconvolution, Otsu, watershed) cannot
classify nuclei: it is scored with its nuclei in an extra "unclassified" class, so they count
in the binary numbers (Dice, bPQ, F1, AJI) and score zero in every per-class number. Both are
scored against the data's class and instance maps with ``PairEvaluation``.

On data with a single foreground class (MoNuSeg's 'nucleus') the model's classes are merged
into it, and only the binary numbers mean anything.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..inference.settings import TileSettings
from ..io.dataset import DatasetError
from ..nuclei.classical import ClassicalSettings, as_unclassified, classical_nuclei
from ..nuclei.watershed import InstanceSettings
from .report import PairEvaluation


def summarise(report: dict, classes: list[str]) -> dict:
    """The headline numbers of a ``PairEvaluation`` report; per-class numbers for ``classes[1:]`` only."""
    o = report["overall"]
    per_class = {c: {"f1": report["per_class"][c]["f1"], "iou": report["per_class"][c]["iou"],
                     "dice": report["per_class"][c]["dice"], "pq": report["per_class"][c]["pq"]}
                 for c in classes[1:]}
    ious = [v["iou"] for v in per_class.values() if not math.isnan(v["iou"])]
    return {
        "nucleus_dice": o["nucleus_dice"], "bpq": o["bpq"], "mpq": o["mpq"], "f1": o["f1"], "aji": o["aji"],
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "per_class": per_class, "images": report["images"],
    }


def trained_normalization(meta) -> dict | None:
    """The input normalisation a checkpoint's weights were trained with, where it differs from its metadata's.

    Checkpoints written by the trainer before it recorded ``normalization`` in its config were
    trained on pixels scaled to [0, 1] only, while their metadata (and so ``Segmenter``) names
    ImageNet mean/std. For those this returns the identity (mean 0, std 1); ``None`` otherwise.
    """
    config = (meta.training or {}).get("config") or {}
    if not config or "normalization" in config:
        return None
    norm = meta.normalization or {}
    if list(norm.get("mean", [0.0])) in ([0.0], [0.0, 0.0, 0.0]) and list(norm.get("std", [1.0])) in ([1.0], [1.0, 1.0, 1.0]):
        return None
    return {"mean": [0.0], "std": [1.0]}


def scores_nuclei_only(model_classes: list[str], classes: list[str]) -> bool:
    """Whether a model is scored as nucleus vs background: the data has one foreground class
    (e.g. MoNuSeg's 'nucleus') and the model other classes. Raises if neither fits."""
    if model_classes == classes:
        return False
    if len(classes) == 2:
        return True
    raise DatasetError(f"The model's classes {model_classes} differ from the data's {classes}.")


def evaluate_segmenter(segmenter, classes: list[str], samples, instance_settings: InstanceSettings | None = None,
                       tile_settings: TileSettings | None = None) -> tuple[dict, float]:
    """(summary, seconds) of a ``Segmenter`` on ``samples``; instances as ``Segmenter.segment_nuclei`` makes them.

    On data with one foreground class every predicted class counts as that class."""
    merge = scores_nuclei_only(segmenter.classes, classes)
    instance_settings = instance_settings or segmenter.instance_settings
    evaluation = PairEvaluation(classes, instance_settings)
    t0 = time.perf_counter()
    for s in samples:
        pred, pred_instances = segmenter.segment_nuclei(s.image, tile_settings, instance_settings=instance_settings)
        if merge:
            pred = (pred > 0).astype(np.uint8)
        evaluation.add(s.stem, s.labels, pred, s.instances, pred_instances)
    return summarise(evaluation.report(), classes), time.perf_counter() - t0


def evaluate_baseline(classes: list[str], samples, settings: ClassicalSettings | None = None) -> tuple[dict, float]:
    """(summary, seconds) of the classical pipeline; its nuclei carry no class (see the module's docstring)."""
    names = list(classes) + (["unclassified"] if len(classes) > 2 else [])
    evaluation = PairEvaluation(names)
    t0 = time.perf_counter()
    for s in samples:
        class_map, instances = classical_nuclei(s.image, settings)
        evaluation.add(s.stem, s.labels, as_unclassified(class_map, len(classes)), s.instances, instances)
    return summarise(evaluation.report(), classes), time.perf_counter() - t0


def score_model_and_baseline(segmenter, classes: list[str], samples, instance_settings: InstanceSettings | None = None,
                             tta: bool = False) -> dict[str, tuple[dict, float]]:
    """``evaluate_segmenter`` and ``evaluate_baseline`` on the same samples: ``(summary, seconds)`` under
    ``model``, ``model_input_as_trained`` (only for a checkpoint whose metadata names another
    input normalisation than it was trained with, see ``trained_normalization``), ``model_tta``
    (with ``tta``: the mean over 4 flips) and ``baseline``, in that order."""
    scores = {"model": evaluate_segmenter(segmenter, classes, samples, instance_settings)}
    as_trained = trained_normalization(segmenter.meta)
    if as_trained is not None:
        shipped = segmenter.meta.normalization
        segmenter.meta.normalization = as_trained
        try:
            scores["model_input_as_trained"] = evaluate_segmenter(segmenter, classes, samples, instance_settings)
        finally:
            segmenter.meta.normalization = shipped
    if tta:
        scores["model_tta"] = evaluate_segmenter(segmenter, classes, samples, instance_settings, TileSettings(tta=True))
    scores["baseline"] = evaluate_baseline(classes, samples)
    return scores
