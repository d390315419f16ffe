"""A model's foreground threshold, tuned on labelled images (the reports tuned their operating
point on validation data rather than taking argmax or 0.5).

The threshold applies to the nucleus (foreground) probability ``1 - p(background)``; pixels
above it get their likeliest foreground class (``inference.classify``). It is chosen to
maximise the pooled binary Dice over the given images (``metrics.threshold_search``: one pass,
histograms, no re-thresholding), on a grid of 0.01 from 0.10 to 0.90.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.dataset import GROUP_PATTERN, DatasetError, open_dataset, source_group
from .semantic import threshold_search

GRID = np.round(np.arange(0.10, 0.9001, 0.01), 2)


def samples_of_groups(data: str | Path, groups: list[str] | None = None, group_pattern: str = GROUP_PATTERN):
    """``(classes, samples)``: the labelled images of a dataset folder whose source image is in
    ``groups`` (``<folder name>/<group>`` as a checkpoint's ``data.val_groups`` names them, or
    the bare group); every image for ``None``. Raises ``DatasetError`` if none match."""
    folder = open_dataset(data, require_labels=True)
    stems = []
    for stem in folder.stems:
        group = source_group(stem, pattern=group_pattern)
        if groups is None or group in groups or f"{folder.root.name}/{group}" in groups:
            stems.append(stem)
    if not stems:
        raise DatasetError(f"No image of {folder.root} belongs to the groups {groups}.")
    return folder.classes, [folder.load(s) for s in stems]


def tune_foreground_threshold(segmenter, samples, settings=None, thresholds=GRID, progress=None) -> dict:
    """The foreground threshold that maximises pooled nucleus Dice of ``segmenter`` on ``samples``
    (objects with ``.image`` and ``.labels``); ``progress(done, total)`` after each image.

    Returns ``threshold``, ``nucleus_dice`` at it, ``argmax_nucleus_dice`` (the model without a
    threshold), ``images`` and the ``curve`` (``thresholds``, ``nucleus_dice``) over the grid.
    """
    samples = list(samples)
    if not samples:
        raise DatasetError("No labelled images to tune the threshold on.")
    counts = {"inter": 0, "total": 0}

    def pairs():
        for done, s in enumerate(samples, 1):
            probs = segmenter.probabilities(s.image, settings)
            gt = np.asarray(s.labels) > 0
            by_argmax = probs.argmax(0) > 0
            counts["inter"] += int((gt & by_argmax).sum())
            counts["total"] += int(gt.sum() + by_argmax.sum())
            yield gt, np.clip(1.0 - probs[0], 0.0, 1.0)
            if progress is not None:
                progress(done, len(samples))

    found = threshold_search(pairs(), thresholds=thresholds, metric="dice")
    return {
        "threshold": found["threshold"],
        "nucleus_dice": found["dice"],
        "argmax_nucleus_dice": 2 * counts["inter"] / counts["total"] if counts["total"] else float("nan"),
        "images": len(samples),
        "curve": {"thresholds": found["curve"]["thresholds"], "nucleus_dice": found["curve"]["dice"]},
    }
