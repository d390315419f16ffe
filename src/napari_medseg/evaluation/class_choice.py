"""How a foreground pixel's class is chosen, tuned by measurement (``medseg tune-classes``, i.e.
``tune_classes_checkpoint``): one weight per foreground class scales its probability before the
likeliest class is taken (``CheckpointMeta.class_choice_weights``, applied by
``inference.blend.classify``).

Why: a model can find nuclei on images it has not seen as well as on its training images while
splitting them between the classes worse (the shipped default calls many held-out inflammatory
nuclei epithelial or spindle; on its training images it does not). The weights move only that
choice: which pixels are nuclei, the nucleus outlines, Dice and bPQ stay exactly as they are.

The model runs once per image; its probabilities, foreground and nuclei are kept and every
candidate re-chooses the classes, scored by mPQ (the mean over classes of PQ, ``PairEvaluation``).
Search: coordinate ascent over ``WEIGHT_GRID`` (each class in turn, the others held, ``ROUNDS``
times), a change kept only if it gains ``MIN_GAIN``; the commonest class (most annotated
pixels) keeps weight 1, since scaling every weight alike changes nothing. Since the drift shows
on unseen images, tune on held-out ones (the model's validation images by default) and read the
leave-one-source-image-out figure it reports: each source image scored with weights chosen on
the others only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..inference.class_decision import foreground_class
from ..inference.segmenter import Segmenter
from ..inference.settings import TileSettings
from ..io.dataset import GROUP_PATTERN, source_group
from ..models import load_checkpoint, read_meta, resolve_model_path, save_checkpoint
from ..models.weights import read_state_dict
from ..steps import ProgressCallback
from .benchmark import summarise
from .report import PairEvaluation
from .threshold import (ThresholdTuningError, check_checkpoint_target, model_group_pattern, model_val_groups,
                        samples_of_groups)

WEIGHT_GRID = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0)  # a class's probability times this
ROUNDS = 2  # passes over the classes
MIN_GAIN = 0.001  # mPQ a change must add to be kept: a few images' noise is not a reason


@dataclass
class KeptImage:
    """One labelled image and what the model made of it, up to the class choice."""

    stem: str
    group: str  # its source image
    labels: np.ndarray
    instances: np.ndarray
    probabilities: np.ndarray  # (C, H, W)
    foreground: np.ndarray  # bool, the model's (threshold applied)
    nuclei: np.ndarray  # the model's instances


def _stem_and_group(sample) -> tuple[str, str]:
    """A dataset folder's sample names its file (``stem``), a training item itself (``name``) and
    its source image (``group``)."""
    stem = getattr(sample, "stem", None) or sample.name
    return stem, getattr(sample, "group", None) or source_group(stem)


def keep_images(segmenter: Segmenter, samples, tiles: TileSettings | None = None,
                on_image: Callable[[], None] | None = None) -> list[KeptImage]:
    """The model run once on every sample (see ``tune_kept_images``)."""
    kept = []
    for s in samples:
        probs = np.zeros((len(segmenter.classes), *s.image.shape[:2]), np.float32)
        class_map, nuclei = segmenter.segment_nuclei(s.image, tiles, probabilities_out=probs)
        kept.append(KeptImage(*_stem_and_group(s), s.labels, s.instances, probs, np.asarray(class_map) > 0, nuclei))
        if on_image is not None:
            on_image()
    return kept


def _chosen(image: KeptImage, weights: list[float]) -> np.ndarray:
    """``image``'s class map with its classes chosen under ``weights``, its foreground as the model had it."""
    return np.where(image.foreground, foreground_class(image.probabilities, weights), 0).astype(np.uint8)


def score(images: list[KeptImage], classes: list[str], weights: list[float], instance_settings) -> dict:
    """``summarise``'s numbers with the classes chosen under ``weights``."""
    evaluation = PairEvaluation(classes, instance_settings)
    for im in images:
        evaluation.add(im.stem, im.labels, _chosen(im, weights), im.instances, im.nuclei)
    return summarise(evaluation.report(), classes)


def search_weights(images: list[KeptImage], classes: list[str], instance_settings,
                   on_candidate: Callable[[], None] | None = None,
                   grid: tuple[float, ...] = WEIGHT_GRID, start: list[float] | None = None) -> tuple[list[float], float]:
    """Coordinate ascent from ``start`` (the model's own weights; none: all 1): ``(weights, mPQ)``,
    never below the start's mPQ on ``images``."""
    weights = list(start) if start else [1.0] * (len(classes) - 1)
    best = score(images, classes, weights, instance_settings)["mpq"]
    anchor = commonest_class(images, len(classes)) - 1
    for _ in range(ROUNDS):
        changed = False
        for c in range(len(weights)):
            if c == anchor:
                continue
            for value in grid:
                if value == weights[c]:
                    continue
                trial = weights[:c] + [value] + weights[c + 1:]
                mpq = score(images, classes, trial, instance_settings)["mpq"]
                if on_candidate is not None:
                    on_candidate()
                if mpq > best + MIN_GAIN:
                    weights, best, changed = trial, mpq, True
        if not changed:
            break
    return weights, best


def commonest_class(images: list[KeptImage], num_classes: int) -> int:
    """The foreground class with the most annotated pixels in ``images``."""
    counts = sum(np.bincount(im.labels[im.labels < num_classes].ravel(), minlength=num_classes) for im in images)
    return int(np.argmax(counts[1:])) + 1


def candidates_per_search(classes: list[str], grid: tuple[float, ...] = WEIGHT_GRID) -> int:
    """Scored candidates of one ``search_weights`` at most (for progress)."""
    return ROUNDS * (len(classes) - 2) * len([v for v in grid if v != 1.0])


def cross_validated(images: list[KeptImage], classes: list[str], instance_settings,
                    on_candidate: Callable[[], None] | None = None,
                    grid: tuple[float, ...] = WEIGHT_GRID, start: list[float] | None = None) -> tuple[dict, dict]:
    """Leave one source image out: ``(numbers, weights chosen per left-out source image)``, each
    source image's classes chosen with weights searched on the others only."""
    chosen = {}
    for group in sorted({im.group for im in images}):
        chosen[group] = search_weights([im for im in images if im.group != group], classes, instance_settings,
                                       on_candidate, grid, start)[0]
    evaluation = PairEvaluation(classes, instance_settings)
    for im in images:
        evaluation.add(im.stem, im.labels, _chosen(im, chosen[im.group]), im.instances, im.nuclei)
    return summarise(evaluation.report(), classes), chosen


def _headline(numbers: dict) -> dict:
    return {"mpq": numbers["mpq"], "miou": numbers["miou"], "bpq": numbers["bpq"],
            "f1": {c: v["f1"] for c, v in numbers["per_class"].items()}}


def tune_classes_checkpoint(model: str | os.PathLike, data: str | Path, out: str | os.PathLike,
                            groups: list[str] | None = None, all_images: bool = False, tta: bool = False,
                            device: str = "auto", grid: tuple[float, ...] = WEIGHT_GRID,
                            progress_for: Callable[[int], ProgressCallback | None] | None = None,
                            overwrite: bool = False) -> dict:
    """Choose ``model``'s class weights on the labelled images of ``data`` (a folder with the
    model's classes and instance maps) and write the checkpoint with them
    (``class_choice_weights``) and a record (``metrics.class_choice_tuning``) to ``out``,
    atomically; the input is never touched.

    The images: those of the source images ``groups``, the model's validation images
    (``data.val_groups``) without them, every image with ``all_images``. Returns
    ``tune_kept_images``' result.
    """
    source = resolve_model_path(model)
    check_checkpoint_target(source, Path(out), overwrite, data)
    meta = read_meta(source)
    if len(meta.classes) < 3:
        raise ThresholdTuningError(f"the model has one foreground class ({meta.classes[1]}): no class to choose")
    if not all_images:
        groups = groups or model_val_groups(meta)
    classes, samples = samples_of_groups(data, None if all_images else groups,
                                         GROUP_PATTERN if all_images else model_group_pattern(meta))
    if classes != meta.classes:
        raise ThresholdTuningError(f"the data's classes {classes} differ from the model's {meta.classes}: "
                                   "class weights are tuned on images labelled with the model's classes")
    samples = [s for s in samples if s.instances is not None]
    if not samples:
        raise ThresholdTuningError(f"{data}: no instance maps (instances/); classes are scored per nucleus (mPQ)")
    record = {"data": str(data), "groups": None if all_images else list(groups), "tta": bool(tta)}
    return tune_kept_images(source, out, samples, device, record, tta, grid, progress_for)


def tune_kept_images(source: Path, out: str | os.PathLike, samples, device: str, record: dict, tta: bool = False,
                     grid: tuple[float, ...] = WEIGHT_GRID,
                     progress_for: Callable[[int], ProgressCallback | None] | None = None) -> dict:
    """The model ``source`` run once on ``samples`` (``.image``, ``.labels``, ``.instances`` with
    its classes; ``.stem`` or ``.name``, and ``.group`` where known), its class weights searched,
    and the checkpoint written with them to ``out`` (``source`` itself for a training run's
    result). Returns the weights, the numbers before and with them, and, with two or more
    source images, the leave-one-source-image-out numbers (``cross_validated``).
    ``progress_for(steps)`` gives the progress callback once the work is known."""
    segmenter = Segmenter.load(source, device=device)  # PyTorch: the reference the weights are measured on
    # the search starts from the model as it is (the default's weights had been dropped for all 1,
    # its 'before' figure not the shipped model's); the network's probabilities are kept plain
    own = list(segmenter.class_weights or [1.0] * (len(segmenter.classes) - 1))
    segmenter.class_weights = None
    classes = segmenter.classes
    sources = len({_stem_and_group(s)[1] for s in samples})
    steps = len(samples) + candidates_per_search(classes, grid) * (1 + (sources if sources > 1 else 0))
    progress = progress_for(steps) if progress_for is not None else None
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(min(done[0], steps), steps)

    images = keep_images(segmenter, samples, TileSettings(tta=tta), step)
    settings = segmenter.instance_settings
    before = score(images, classes, own, settings)
    weights, _ = search_weights(images, classes, settings, step, grid, own)
    result = {"weights": weights, "own_weights": own, "before": _headline(before),
              "tuned": _headline(score(images, classes, weights, settings)),
              "images": len(images), "source_images": sources}
    if sources > 1:
        numbers, per_group = cross_validated(images, classes, settings, step, grid, own)
        result["cross_validated"] = {**_headline(numbers), "weights": per_group}
    if progress is not None:
        progress(steps, steps)
    record = {**result, **record, "rule": "mPQ, coordinate ascent over " + ", ".join(f"{v:g}" for v in grid)}
    write_class_weights(source, out, weights, record)
    return result


def write_class_weights(source: Path, out: str | os.PathLike, weights: list[float], record: dict) -> Path:
    """A copy of ``source`` at ``out`` with ``weights`` as its ``class_choice_weights`` (all 1:
    none) and ``record`` as ``metrics.class_choice_tuning``."""
    model, meta = load_checkpoint(source)
    meta.class_choice_weights = [] if all(w == 1.0 for w in weights) else [float(w) for w in weights]
    meta.metrics["class_choice_tuning"] = record
    half = any(t.dtype == torch.float16 for t in read_state_dict(source).values())  # keep the stored precision
    return save_checkpoint(out, model, meta, half=half)  # atomic: the input is never half-overwritten
