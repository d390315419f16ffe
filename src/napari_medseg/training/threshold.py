"""A run's foreground threshold: the start model's while training, re-tuned at the end on the
run's own validation images (``evaluation.threshold``: the threshold on ``1 - p(background)``
that maximises their pooled nucleus Dice), so a fine-tuned checkpoint never loses it. With
``tune_classes``, its class weights too (``evaluation.class_choice``), on the class sets' images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation.threshold import tune_foreground_threshold, write_threshold
from ..inference.segmenter import Segmenter
from .data import LabelledImage
from .mixed import nucleus_mask


@dataclass
class TuningImage:
    image: np.ndarray  # float (H, W, C) in [0, 1]
    labels: np.ndarray  # True where a nucleus is


TRAINING_VALIDATION_IMAGES = "the training run's validation images"  # what a run's own tuning records


def retune_threshold(checkpoint: Path, val_items: list[LabelledImage], device: str) -> dict:
    """Tune ``checkpoint``'s threshold on ``val_items`` (class and binary sets alike: nucleus vs
    background) and write it into the checkpoint in place (atomically). Returns the tuning."""
    segmenter = Segmenter.load(checkpoint, device=device)
    segmenter.foreground_threshold = None  # tune from the raw probabilities
    images = [TuningImage(it.image, nucleus_mask(it)) for it in val_items]
    result = tune_foreground_threshold(segmenter, images)
    groups = sorted({it.group for it in val_items})
    write_threshold(checkpoint, checkpoint, result,
                    {"data": TRAINING_VALIDATION_IMAGES, "groups": groups, "images": len(images),
                     "tta": False})
    return result


def retune_classes(checkpoint: Path, val_items: list[LabelledImage], device: str) -> dict | None:
    """Choose ``checkpoint``'s class weights on the items of ``val_items`` that carry classes and
    instance maps (binary sets name no class) and write them into it in place (atomically), as
    ``medseg tune-classes`` does on the same images; ``None`` (nothing written) without such items."""
    from ..evaluation.class_choice import tune_kept_images

    items = [it for it in val_items if not it.binary and it.instances is not None]
    if not items:
        return None
    record = {"data": TRAINING_VALIDATION_IMAGES, "groups": sorted({it.group for it in items}),
              "tta": False}
    return tune_kept_images(checkpoint, checkpoint, items, device, record)
