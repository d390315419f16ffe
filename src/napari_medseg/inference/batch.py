"""Many image files through one model into an output folder (what ``medseg predict`` does).

For every file: ``OUT/labels/<stem>.tif`` (class map), ``OUT/instances/<stem>.tif`` (nucleus
ids, unless only class maps are asked for) and, on request, ``OUT/probabilities/<stem>.npy``
(float16, classes x H x W). ``OUT/classes.json`` names the classes. Large or pyramidal TIFFs
are read lazily, and probabilities go straight into a memory-mapped file, so neither the
image nor the probabilities of a slide need to fit in memory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import MedsegError
from ..io.dataset import write_classes
from ..io.images import ImageReadError, file_stem, label_record, read_image, write_label_map
from ..io.lazy import open_tiff_lazy, should_open_lazily
from ..io.pixel_size import file_pixel_size_um
from ..io.outputs import (
    check_not_input, check_unique_stems, claim_classes, remove_stale_temps, reserve, temp_path, write_error,
)
from ..nuclei.votes import instance_classes
from ..steps import ProgressCallback
from .run_report import RunReport
from .postprocess import PostprocessSettings
from .segmenter import Segmenter
from .settings import TileSettings

ARGMAX = "argmax"  # a foreground threshold that means: no threshold, the likeliest class
# what a prediction folder holds, beside classes.json: class maps, nucleus maps, probabilities, and
# each image's nuclei as a table (CSV) and QuPath outlines (GeoJSON), as a slide run writes them
RESULT_FOLDERS = ("labels", "instances", "probabilities", "nuclei")


@dataclass
class BatchSettings:
    """What to make of every file, beside how to tile it."""

    tiles: TileSettings = field(default_factory=TileSettings)
    postprocess: PostprocessSettings = field(default_factory=PostprocessSettings)
    nuclei: bool = True  # False: class maps only
    # InstanceSettings fields that replace the model's own (Segmenter.instance_settings)
    instance_overrides: dict = field(default_factory=dict)
    probabilities: bool = False
    # None: the model's tuned threshold (argmax if it has none); ARGMAX; or a probability in (0, 1)
    foreground_threshold: float | str | None = None
    # None: the model's class weights (medseg tune-classes); [] none; or one per foreground class
    class_weights: list[float] | None = None
    # µm/px of every input (resampled to the model's pixel size); None: each file's own, if it records one
    pixel_size_um: float | None = None
    use_file_pixel_size: bool = True  # False: images are taken at the model's pixel size, whatever they record


@dataclass
class FilePrediction:
    """What became of one input file."""

    file: Path
    skipped: str | None = None  # why the file could not be read; nothing was written for it
    labels: Path | None = None
    instances: Path | None = None  # None also when the image is too large for instances
    nuclei_table: Path | None = None  # nuclei/<stem>.csv: one row per nucleus (class, area, centroid, intensity)
    nuclei_outlines: Path | None = None  # nuclei/<stem>.geojson: QuPath outlines in the image's pixels
    nuclei_per_class: dict[str, int] | None = None  # the table's nuclei by class (None: no table made)
    probabilities: Path | None = None
    shape: tuple[int, int] | None = None
    pixel_size_um: float | None = None  # the pixel size the file was segmented at (None: taken as the model's)
    report: RunReport = field(default_factory=RunReport)
    # the notes of ``report`` that are the runtime's (how it was chosen at load): the same for every
    # file of a run, said once by a caller (``medseg predict`` had repeated them under each file)
    runtime_notes: list[str] = field(default_factory=list)
    # an earlier run's nuclei or probabilities of this file that this run did not remake: removed,
    # as they described the class map this run replaced (``medseg evaluate`` would score them)
    removed: list[Path] = field(default_factory=list)


def open_for_prediction(path: Path):
    """Large or pyramidal TIFFs lazily (full resolution), anything else in memory."""
    if should_open_lazily(path):
        return open_tiff_lazy(path)[0]
    return read_image(path)


def predict_to_folder(files: list[Path], out: str | Path, model: str | os.PathLike = "default",
                      settings: BatchSettings | None = None, device: str = "auto", source: str = "",
                      progress_for: Callable[[int, int, Path], ProgressCallback | None] | None = None,
                      backend: str = "auto", precision: str = "auto") -> Iterator[FilePrediction]:
    """Generator: segments ``files`` one by one into ``out``, yielding a ``FilePrediction`` after each.

    The model loads (and the settings are checked against it) on the first step.
    ``progress_for(index, count, file)`` gives the tile progress callback of each file (1-based
    ``index``); ``source`` is recorded in ``classes.json``. A file that cannot be read is skipped
    (``FilePrediction.skipped``); any other error stops the run, leaving no partial file behind.
    ``backend``: who runs the network (``inference.backends``; ``auto`` = the fastest that matches PyTorch),
    ``precision``: ``auto``, ``fp32`` or the opt-in ``int8`` (see ``Segmenter.load``).
    ``out`` may not be a dataset folder, hold an input where it writes, be unwritable, nor hold
    another model's results (``io.outputs``), and two files may not share a stem.
    """
    settings = settings or BatchSettings()
    out, files = Path(out), [Path(f) for f in files]
    check_not_input(out, files, RESULT_FOLDERS)
    check_unique_stems(files, file_stem)
    check_writable_folder(out)  # before the model loads, and named as the user gave it (not a temp file in it)
    check_result_folders_free(out)
    # by a runtime this machine has checked before, without torch (seconds of start-up, 0.65 GB)
    segmenter = Segmenter.load(model, device=device, backend=backend, precision=precision, recorded=True)
    if settings.foreground_threshold is not None:
        threshold = settings.foreground_threshold
        segmenter.foreground_threshold = None if threshold == ARGMAX else float(threshold)
    if settings.class_weights is not None:
        use_class_weights(segmenter, settings.class_weights)
    settings.tiles.checked(segmenter.meta.model.output_stride)
    segmenter.instance_settings_with(settings.instance_overrides)  # refused here, before any file
    # the folder's classes.json names this run as its source (a second model's run into the same
    # folder had kept the first run's): rewritten unless it already says so
    classes_pending = claim_classes(out, segmenter.classes, RESULT_FOLDERS) or _recorded_source(out) != source

    def write_classes_once() -> None:
        # with the first result, not before: a run whose every file is unreadable leaves no
        # folder holding a classes.json and nothing else, nor changes the one there
        nonlocal classes_pending
        if classes_pending:
            write_classes(out, segmenter.classes, source=source)
            classes_pending = False

    remove_stale_temps(out, *(out / sub for sub in RESULT_FOLDERS))
    for index, file in enumerate(files, 1):
        progress = progress_for(index, len(files), file) if progress_for is not None else None
        yield predict_file(segmenter, file, out, settings, progress, before_writing=write_classes_once)


def _recorded_source(out: Path) -> str | None:
    """The ``source`` of ``out``'s classes.json (``None`` where it cannot be read)."""
    from ..io.dataset import read_classes

    try:
        return read_classes(out)[1]
    except (MedsegError, OSError):
        return None


def check_writable_folder(out: Path, flag: str = "--out") -> None:
    """Refuses an output folder (or, where it does not exist yet, the folder it would be made in)
    that cannot be written: said before any work, naming the folder the user gave."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():  # not 'Permission denied' for a file in the way
        raise write_error(out, OSError(errno.ENOTDIR, f"{existing} is a file, not a folder"))
    if existing is None or os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    cause = OSError(errno.EROFS if read_only else errno.EACCES, os.strerror(errno.EROFS if read_only else errno.EACCES))
    raise write_error(out, cause)


def check_result_folders_free(out: Path) -> None:
    """Refuses an output folder where a file has the name of a folder results go in (``labels``,
    ``instances``, ...): said before any work (it had failed after the first class map, with
    'File exists', leaving that map without its nuclei)."""
    for name in (*RESULT_FOLDERS, "classes.json"):
        path = out / name
        if path.exists() and path.is_dir() == (name == "classes.json"):
            what = "a folder" if path.is_dir() else "a file"
            raise write_error(out, OSError(errno.EEXIST, f"{path} is {what}, where the results' "
                                           f"{'classes file' if name == 'classes.json' else 'folder'} goes; "
                                           "move it or choose another --out"))


def predict_file(segmenter: Segmenter, file: Path, out: Path, settings: BatchSettings,
                 progress: ProgressCallback | None = None,
                 before_writing: Callable[[], None] | None = None) -> FilePrediction:
    """One file into ``out`` (see ``predict_to_folder``); an unreadable file is skipped, not raised.
    ``before_writing`` is called once the file is segmented, before its results are written."""
    result = FilePrediction(Path(file), runtime_notes=list(segmenter.backend.notes))
    try:
        image = open_for_prediction(result.file)
        result.pixel_size_um = settings.pixel_size_um or (
            file_pixel_size_um(result.file) if settings.use_file_pixel_size else None)
        labels, instances = _segment_into(segmenter, image, out, file_stem(result.file), settings, progress, result,
                                          before_writing)
    except ImageReadError as exc:  # also raised mid-run by a lazily read file (io.lazy names it)
        return FilePrediction(result.file, skipped=str(exc))
    stem = file_stem(result.file)
    if instances is not None:
        votes = instance_classes(instances, labels)
        record = label_record("instances", segmenter.classes, segmenter.meta.colors, instance_classes=votes)
        result.instances = write_label_map(out / "instances" / f"{stem}.tif", instances, result.pixel_size_um, record)
        _write_nuclei_tables(segmenter, image, labels, instances, votes, out / "nuclei", stem, result)
    outdated = ([] if result.instances is not None else
                [out / "instances" / f"{stem}.tif", out / "nuclei" / f"{stem}.csv", out / "nuclei" / f"{stem}.geojson"]) + \
        ([] if result.probabilities is not None else [out / "probabilities" / f"{stem}.npy"])
    for path in outdated:
        if path.is_file():
            path.unlink()
            result.removed.append(path)
    return result


def _write_nuclei_tables(segmenter: Segmenter, image, labels: np.ndarray, instances: np.ndarray, votes: np.ndarray,
                         folder: Path, stem: str, result: FilePrediction) -> None:
    """``nuclei/<stem>.csv`` (a row per nucleus: its class, area in px and, where the image's pixel
    size is known, µm², centroid and mean intensity) and ``nuclei/<stem>.geojson`` (QuPath), the
    nuclei and classes of the maps just written."""
    from ..io.geojson import write_geojson
    from ..io.tables import write_csv
    from ..nuclei.measure import counts_per_class, object_table

    names = segmenter.classes
    # intensities of an image in memory (a large TIFF read lazily is not read whole again for them)
    pixels = image if isinstance(image, np.ndarray) else None
    table = object_table(instances, labels, names, image=pixels, pixel_size_um=result.pixel_size_um)
    per_class, order = counts_per_class(table), {name: i for i, name in enumerate(names)}
    result.nuclei_per_class = dict(sorted(per_class.items(), key=lambda item: order.get(item[0], len(names))))
    result.nuclei_table = write_csv(folder / f"{stem}.csv", table)
    result.nuclei_outlines = write_geojson(folder / f"{stem}.geojson", instances, votes, names, segmenter.meta.colors)


def _segment_into(segmenter: Segmenter, image, out: Path, stem: str, settings: BatchSettings,
                  progress: ProgressCallback | None, result: FilePrediction,
                  before_writing: Callable[[], None] | None = None):
    """Segments ``image``, writes its class map (and probabilities), fills in ``result``;
    returns ``(class map, instances or None)``."""
    probs = tmp = None
    made: list[Path] = []  # folders made for the probabilities: removed again if nothing went into them
    try:
        if settings.probabilities:
            result.probabilities = out / "probabilities" / f"{stem}.npy"
            tmp = temp_path(result.probabilities)  # renamed when complete: never a half-written .npy
            made = [p for p in (tmp.parent, *tmp.parent.parents) if not p.exists()]
            probs = _probability_file(tmp, result.probabilities, (len(segmenter.classes), *image.shape[:2]))
        if not settings.nuclei:
            labels, instances = segmenter.segment(image, settings.tiles, progress, postprocess=settings.postprocess,
                                                  probabilities_out=probs, pixel_size_um=result.pixel_size_um), None
        else:  # nuclei seeded by the model's distance head where it has one
            labels, instances = segmenter.segment_nuclei(image, settings.tiles, progress,
                                                         postprocess=settings.postprocess,
                                                         instance_settings=segmenter.instance_settings_with(
                                                             settings.instance_overrides),
                                                         probabilities_out=probs, pixel_size_um=result.pixel_size_um)
        result.report, result.shape = segmenter.last_report, labels.shape
        if before_writing is not None:
            before_writing()
        result.labels = write_label_map(out / "labels" / f"{stem}.tif", labels, result.pixel_size_um,  # tiled when large
                                        label_record("classes", segmenter.classes, segmenter.meta.colors))
        if probs is not None:
            probs.flush()
            probs = None  # closes the memmap before the rename
            os.replace(tmp, result.probabilities)
    finally:
        # a failed or interrupted run leaves no hidden partial probability file behind, nor the
        # empty folders made for it (a full disk at the reservation had left OUT/probabilities/)
        probs = None
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for folder in made:  # deepest first; one that holds anything (the class map) stays
            try:
                folder.rmdir()
            except OSError:
                break
    return labels, instances


def _probability_file(tmp: Path, target: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float16 .npy memory map at ``tmp`` with all its bytes allocated on disk now: a disk that
    fills later would otherwise kill the process (SIGBUS) when a page is written."""
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        probs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    except OSError as exc:
        raise write_error(target, exc) from None
    fd = os.open(tmp, os.O_RDWR)
    try:
        reserve(fd, target, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return probs


def use_class_weights(segmenter, weights: list[float]) -> None:
    """Name ``segmenter``'s classes with ``weights`` (one per foreground class) instead of its
    model's; ``[]``: the plain likeliest class. Refuses a count that does not fit the model."""
    foreground = segmenter.classes[1:]
    if weights and len(weights) != len(foreground):
        raise MedsegError(f"--class-weights: {len(weights)} numbers for {len(foreground)} classes "
                          f"({', '.join(foreground)}); give one per class, in that order, or 'none'.")
    segmenter.class_weights = list(weights) or None
