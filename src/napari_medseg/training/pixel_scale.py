"""Training images at the run's pixel size: a model learns nuclei at the µm/px it is trained at.

A 20x image (0.5 µm/px, recorded in its TIFF) in a 40x run (0.25 µm/px) had been trained on at its
own pixels, its nuclei half the size the model would then expect, and the checkpoint still said
0.25. Images whose file (or layer) records another pixel size are resampled to the run's before
the split, as inference resamples an image to its model's; unknown sizes are taken as the run's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..inference.rescale import MAX_UPSCALE, SCALE_TOLERANCE, resample
from ..wording import counted
from .events import TrainingError
from .items import LabelledImage


def nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label map resampled to ``shape`` by its nearest pixel (ids are never blended)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def at_pixel_size(items: list[LabelledImage], run_pixel_size_um: float | None) -> tuple[list[LabelledImage], str]:
    """``items`` with those of another recorded pixel size resampled to ``run_pixel_size_um``
    (images bilinear, antialiased when shrinking; labels and nuclei nearest), and a note saying
    which; all as they are where the run records no pixel size."""
    if not run_pixel_size_um:
        return items, ""
    coarse = [it for it in items if it.pixel_size_um and it.pixel_size_um / run_pixel_size_um > MAX_UPSCALE]
    if coarse:  # 20 µm/px tags on a 128² tile had enlarged it 80-fold: 24 GB, killed after minutes
        sizes = sorted({it.pixel_size_um for it in coarse})
        raise TrainingError(
            f"{counted(len(coarse), 'training image')} ({', '.join(it.name for it in coarse[:3])}"
            f"{' ...' if len(coarse) > 3 else ''}) {'records' if len(coarse) == 1 else 'record'} "
            f"{', '.join(f'{s:g}' for s in sizes)} µm/px, more than {MAX_UPSCALE:g}x coarser than the run's "
            f"{run_pixel_size_um:g} µm/px: too few pixels a nucleus to learn from. Train on scans of 10x or finer, "
            "or correct the files' pixel size.")
    out, moved = [], {}
    for item in items:
        factor = (item.pixel_size_um or run_pixel_size_um) / run_pixel_size_um
        if abs(factor - 1) <= SCALE_TOLERANCE:
            out.append(item)
            continue
        height, width = item.labels.shape
        shape = (max(1, round(height * factor)), max(1, round(width * factor)))
        out.append(replace(item, image=resample(item.image, shape, channels_last=True),
                           labels=nearest(item.labels, shape),
                           instances=None if item.instances is None else nearest(item.instances, shape),
                           pixel_size_um=run_pixel_size_um))
        key = (item.dataset, item.pixel_size_um)
        moved[key] = moved.get(key, 0) + 1
    said = [f"{(name + ': ') if name else ''}{counted(n, 'image')} at {size:g} µm/px resampled "
            f"x{size / run_pixel_size_um:.2g} to the run's {run_pixel_size_um:g} µm/px"
            for (name, size), n in moved.items()]
    return out, "; ".join(said) + ("." if said else "")
