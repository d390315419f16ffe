"""Many image files through one model into an output folder (what ``medseg predict`` does).

For every file: ``OUT/labels/<stem>.tif`` (class map), ``OUT/instances/<stem>.tif`` (nucleus
ids, unless only class maps are asked for) and, on request, ``OUT/probabilities/<stem>.npy``
(float16, classes x H x W). ``OUT/classes.json`` names the classes. Large or pyramidal TIFFs
are read lazily, and probabilities go straight into a memory-mapped file, so neither the
image nor the probabilities of a slide need to fit in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..io.dataset import write_classes
from ..io.images import ImageReadError, file_stem, read_image, write_label_map
from ..io.lazy import open_tiff_lazy, should_open_lazily
from ..nuclei.watershed import InstanceSettings
from ..steps import ProgressCallback
from .forward import RunReport
from .postprocess import PostprocessSettings
from .segmenter import Segmenter
from .settings import TileSettings

ARGMAX = "argmax"  # a foreground threshold that means: no threshold, the likeliest class


@dataclass
class BatchSettings:
    """What to make of every file, beside how to tile it."""

    tiles: TileSettings = field(default_factory=TileSettings)
    postprocess: PostprocessSettings = field(default_factory=PostprocessSettings)
    instances: InstanceSettings | None = field(default_factory=InstanceSettings)  # None: class maps only
    probabilities: bool = False
    # None: the model's tuned threshold (argmax if it has none); ARGMAX; or a probability in (0, 1)
    foreground_threshold: float | str | None = None


@dataclass
class FilePrediction:
    """What became of one input file."""

    file: Path
    skipped: str | None = None  # why the file could not be read; nothing was written for it
    labels: Path | None = None
    instances: Path | None = None  # None also when the image is too large for instances
    probabilities: Path | None = None
    shape: tuple[int, int] | None = None
    report: RunReport = field(default_factory=RunReport)


def open_for_prediction(path: Path):
    """Large or pyramidal TIFFs lazily (full resolution), anything else in memory."""
    if should_open_lazily(path):
        return open_tiff_lazy(path)[0]
    return read_image(path)


def predict_to_folder(files: list[Path], out: str | Path, model: str | os.PathLike = "default",
                      settings: BatchSettings | None = None, device: str = "auto", source: str = "",
                      progress_for: Callable[[int, int, Path], ProgressCallback | None] | None = None,
                      ) -> Iterator[FilePrediction]:
    """Generator: segments ``files`` one by one into ``out``, yielding a ``FilePrediction`` after each.

    The model loads (and the settings are checked against it) on the first step.
    ``progress_for(index, count, file)`` gives the tile progress callback of each file (1-based
    ``index``); ``source`` is recorded in ``classes.json``. A file that cannot be read is skipped
    (``FilePrediction.skipped``); any other error stops the run, leaving no partial file behind.
    """
    settings = settings or BatchSettings()
    segmenter = Segmenter.load(model, device=device)
    if settings.foreground_threshold is not None:
        threshold = settings.foreground_threshold
        segmenter.foreground_threshold = None if threshold == ARGMAX else float(threshold)
    settings.tiles.checked(segmenter.meta.model.output_stride)
    out = Path(out)
    write_classes(out, segmenter.classes, source=source)
    for index, file in enumerate(files, 1):
        progress = progress_for(index, len(files), file) if progress_for is not None else None
        yield predict_file(segmenter, file, out, settings, progress)


def predict_file(segmenter: Segmenter, file: Path, out: Path, settings: BatchSettings,
                 progress: ProgressCallback | None = None) -> FilePrediction:
    """One file into ``out`` (see ``predict_to_folder``); an unreadable file is skipped, not raised."""
    result = FilePrediction(Path(file))
    try:
        image = open_for_prediction(result.file)
        labels, instances = _segment_into(segmenter, image, out, file_stem(result.file), settings, progress, result)
    except ImageReadError as exc:  # also raised mid-run by a lazily read file
        return FilePrediction(result.file, skipped=str(exc))
    if instances is not None:
        result.instances = write_label_map(out / "instances" / f"{file_stem(result.file)}.tif", instances)
    return result


def _segment_into(segmenter: Segmenter, image, out: Path, stem: str, settings: BatchSettings,
                  progress: ProgressCallback | None, result: FilePrediction):
    """Segments ``image``, writes its class map (and probabilities), fills in ``result``;
    returns ``(class map, instances or None)``."""
    probs = tmp = None
    if settings.probabilities:
        result.probabilities = out / "probabilities" / f"{stem}.npy"
        result.probabilities.parent.mkdir(parents=True, exist_ok=True)
        # written under a hidden name and renamed when complete: never a half-written .npy
        tmp = result.probabilities.with_name(f".{result.probabilities.name}.{os.getpid()}.part")
        height, width = image.shape[:2]  # readers hand over (H, W[, C])
        probs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                          shape=(len(segmenter.classes), height, width))
    try:
        if settings.instances is None:
            labels, instances = segmenter.segment(image, settings.tiles, progress, postprocess=settings.postprocess,
                                                  probabilities_out=probs), None
        else:  # nuclei seeded by the model's distance head where it has one
            labels, instances = segmenter.segment_nuclei(image, settings.tiles, progress,
                                                         postprocess=settings.postprocess,
                                                         instance_settings=settings.instances,
                                                         probabilities_out=probs)
        result.report, result.shape = segmenter.last_report, labels.shape
        result.labels = write_label_map(out / "labels" / f"{stem}.tif", labels)  # tiled + compressed when large
        if probs is not None:
            probs.flush()
            probs = None  # closes the memmap before the rename
            os.replace(tmp, result.probabilities)
    finally:
        # a failed or interrupted run leaves no hidden partial probability file behind
        if probs is not None:
            probs = None
            tmp.unlink(missing_ok=True)
    return labels, instances
