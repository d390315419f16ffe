"""What the browser front does, free of Gradio: load models once, segment uploads, compare with
ground truth, write the downloads. Every step calls the core; this module only arranges it.

Files are read only from what the browser uploaded (paths Gradio hands over) and written only
into a fresh temporary folder per run; model files are offered by name, never by path.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from ..evaluation.error_maps import error_map
from ..evaluation.ground_truth import compare_to_ground_truth, ground_truth_from_label_map
from ..inference import Segmenter, TileSettings
from ..inference.regions import Region, whole_slide
from ..io.geojson import write_geojson
from ..inference.rescale import model_scale
from ..io.images import file_stem, label_record, read_image, read_label_map, to_rgb_float, write_label_map
from ..io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM, file_pixel_size_um, unknown_pixel_size_note
from ..io.slides import is_slide_path, open_slide
from ..io.tables import write_csv
from ..models import read_meta
from ..nuclei.measure import object_table
from ..nuclei.votes import instance_classes
from ..nuclei.watershed import INSTANCE_MAX_PIXELS
from ..steps import Cancelled

DEFAULT_MODEL = "default (shipped)"
MAX_PIXELS = INSTANCE_MAX_PIXELS  # above this the nuclei step cannot run; refuse rather than half-serve


class WebInputError(MedsegError, ValueError):
    """An upload or a choice in the page cannot be used (the message is shown in the page)."""


_RESULTS_ROOT: Path | None = None


def results_folder() -> Path:
    """A fresh folder for one image's downloads, inside this server's own temporary folder,
    which goes when the server stops (``atexit``); a session's older ones go sooner
    (``remove_results``)."""
    global _RESULTS_ROOT
    if _RESULTS_ROOT is None or not _RESULTS_ROOT.is_dir():
        _RESULTS_ROOT = Path(tempfile.mkdtemp(prefix="medseg-web-"))
        atexit.register(shutil.rmtree, _RESULTS_ROOT, True)
    return Path(tempfile.mkdtemp(prefix="result-", dir=_RESULTS_ROOT))


def remove_results(results: dict | None) -> None:
    """Deletes the download folders of a session's results (replaced by a new run, or the
    visitor gone); only folders this server made."""
    for result in (results or {}).values():
        folder = getattr(result, "folder", None)
        if folder is not None and _RESULTS_ROOT is not None and Path(folder).parent == _RESULTS_ROOT:
            shutil.rmtree(folder, ignore_errors=True)


class ModelStore:
    """The shipped model and the checkpoints of one folder, offered by name, each loaded once.

    Loading and running share one lock: the CPU runs one image at a time, and a model is never
    loaded twice by two users who ask at once.
    """

    def __init__(self, models_dir: str | Path | None = None, device: str = "auto", backend: str = "torch"):
        self.models_dir = Path(models_dir).expanduser() if models_dir else None
        self.device, self.backend = device, backend  # backend: who runs the network (``inference.backends``)
        self.lock = threading.Lock()
        self._loaded: dict[str, Segmenter] = {}

    def names(self) -> list[str]:
        names = [DEFAULT_MODEL]
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in sorted(self.models_dir.rglob("*.safetensors")):
                try:
                    read_meta(path)  # only real napari-medseg checkpoints are offered
                except MedsegError:
                    continue
                names.append(path.relative_to(self.models_dir).as_posix())
        return names

    def _path(self, name: str) -> str:
        if name == DEFAULT_MODEL:
            return "default"
        if name not in self.names():  # a name from the list, never a path typed by a client
            raise WebInputError(f"Unknown model '{name}'. Choose one of the list.")
        return str(self.models_dir / name)

    def get(self, name: str) -> Segmenter:
        """The loaded model (call with ``lock`` held)."""
        if name not in self._loaded:
            segmenter = Segmenter.load(self._path(name), device=self.device, backend=self.backend,
                                       recorded=True)  # without torch where a runtime was checked
            runner = segmenter.backend
            # how the runtime was chosen is the operator's business: said once, here on the server's
            # console, not after every image in the page (a visitor read "argmax agreement 99.64% <
            # 99.9%" under each result as if the image had failed a check)
            print(f"napari-medseg web: model '{name}' runs on {runner.name} ({runner.precision})"
                  + "".join(f"; {note}" for note in runner.notes), file=sys.stderr, flush=True)
            self._loaded[name] = segmenter
        return self._loaded[name]


@dataclass
class ImageResult:
    """One segmented upload and everything the page shows or offers for it."""

    name: str
    display: np.ndarray  # uint8 RGB, what the browser shows under the overlays
    class_map: np.ndarray
    instances: np.ndarray
    classes: list[str]
    colors: list
    table: dict
    pixel_size_um: float | None
    folder: Path
    downloads: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the run report says the user should know
    origin: tuple[int, int] | None = None  # (y, x) of a region in its image or slide; None: the whole file
    comparison: "Comparison | None" = None  # the last comparison with a ground truth, shown with it


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any readable image as uint8 RGB for the browser (16-bit and gray included)."""
    return np.round(to_rgb_float(image, 3) * 255).astype(np.uint8)


def read_upload(path: str | Path, region: str | None = None,
                notes: list[str] | None = None) -> tuple[np.ndarray, float | None, tuple | None]:
    """``(image, its pixel size in µm or None, (y, x) origin)``: an image file or a whole slide
    (origin ``None``), or a region of either (``"x,y,w,h"`` in level-0 px; a small slide may be
    taken whole); the origin places the region's results in the file's pixels. A region partly
    off the file is cut to it, and ``notes`` gets a line saying so."""
    if is_slide_path(path):
        slide = open_slide(path)
        area = _region_on(region, slide.shape, "slide", path, notes) if region else whole_slide(slide)
        if area.width * area.height > MAX_PIXELS:
            raise WebInputError(f"'{Path(path).name}' is {slide.shape[1]}x{slide.shape[0]} px: give a region "
                                f"x,y,w,h (level-0 px) of at most {MAX_PIXELS / 1e6:.0f} Mpx.")
        pixels = _checked_size(np.asarray(slide.levels[0][area.slices]), path)
        return pixels, slide.pixel_size_um, (area.y, area.x) if region else None
    # clear messages for unreadable files, NaN, odd shapes; a TIFF's recorded pixel size where believable
    image = _checked_size(read_image(path), path)
    if not region:
        return image, file_pixel_size_um(path), None
    area = _region_on(region, image.shape[:2], "image", path, notes)
    return image[area.slices], file_pixel_size_um(path), (area.y, area.x)


def _region_on(text: str, shape: tuple[int, int], where: str, path, notes: list[str] | None) -> Region:
    """The region typed in the page, cut to the file; a cut one is said (it had been taken
    silently: 10,10,5000,5000 on a 1000² tile segmented 990x990 px without a word)."""
    asked = Region.parse(text)
    area = asked.checked(shape, where)
    if area != asked and notes is not None:
        notes.append(f"Region {asked.x},{asked.y},{asked.width},{asked.height} reaches outside '{Path(path).name}' "
                     f"({shape[1]}x{shape[0]} px): segmented its part on the {where}, "
                     f"{area.x},{area.y},{area.width},{area.height}.")
    return area


def checked_pixel_size(value: float | None) -> float | None:
    """The pixel size typed in the page: ``None`` (the file's own) or µm per pixel a microscope
    gives, as ``medseg predict --pixel-size`` takes it (100 would have upscaled a patch 400-fold
    and held the one queue for hours)."""
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    if value is None or value == 0:
        return None
    if not low <= value <= high:
        raise WebInputError(f"Pixel size {value:g} µm/px: give µm per pixel from {low} to {high} (0.5 for 20x, "
                            "0.25 for 40x; not the magnification), or 0 for what the file records.")
    return float(value)


def image_notes(segmenter: Segmenter) -> list[str]:
    """What the last run's report says about the image (gray, fluorescence, resampled, memory),
    without the runtime's own notes, which are the same for every image (``ModelStore.get``)."""
    return [note for note in segmenter.last_report.notes if note not in segmenter.backend.notes]


def _checked_work(image: np.ndarray, path, scale: float) -> None:
    """The model runs on the image resampled to its pixel size: that, not the upload, must fit."""
    pixels = image.shape[0] * image.shape[1] * scale * scale
    if scale > 1 and pixels > MAX_PIXELS:
        raise WebInputError(f"'{Path(path).name}' resampled to the model's pixel size ({scale:.2g}x) would be "
                            f"{pixels / 1e6:.0f} Mpx; the browser front takes up to {MAX_PIXELS / 1e6:.0f} Mpx. "
                            "Check the pixel size, give a region, or use `medseg predict`.")


def _checked_size(image: np.ndarray, path) -> np.ndarray:
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise WebInputError(f"'{Path(path).name}' has {image.shape[0]}x{image.shape[1]} pixels; the browser front "
                            f"takes images up to {MAX_PIXELS / 1e6:.0f} Mpx. Use `medseg predict` for larger ones.")
    return image


def segment_upload(path: str | Path, segmenter: Segmenter, threshold: float | None = None, tta: bool = False,
                   pixel_size_um: float | None = None, progress=None, region: str | None = None,
                   nucleus_settings: dict | None = None, name: str | None = None,
                   should_cancel=None) -> ImageResult:
    """Segment one uploaded file (or a region of it) into classes and nuclei and write its
    downloads (named ``name``, the file's stem by default), in the file's pixels: a region's
    outlines and centroids are placed where it lies. The file's own pixel size serves where none
    is given; with one, the model sees the image at its own pixel size and areas are in µm².
    ``nucleus_settings``: ``InstanceSettings`` fields in place of the model's own."""
    instance_settings = segmenter.instance_settings_with(nucleus_settings)  # a bad value: refused before reading
    pixel_size_um = checked_pixel_size(pixel_size_um)
    region_notes: list[str] = []
    image, own_pixel_size, origin = read_upload(path, region, region_notes)
    pixel_size_um = pixel_size_um or own_pixel_size
    _checked_work(image, path, model_scale(pixel_size_um, segmenter.meta.pixel_size_um))
    segmenter.foreground_threshold = threshold or segmenter.meta.foreground_threshold
    class_map, instances = segmenter.segment_nuclei(image, TileSettings(tta=tta), progress, should_cancel,
                                                    instance_settings=instance_settings, pixel_size_um=pixel_size_um)
    votes = instance_classes(instances, class_map)
    classes, colors = segmenter.classes, segmenter.meta.colors
    table = object_table(instances, class_map, classes, pixel_size_um=pixel_size_um)
    if origin:  # in the file's pixels, as medseg predict --region writes them
        table["centroid_y"] = table["centroid_y"] + origin[0]
        table["centroid_x"] = table["centroid_x"] + origin[1]
    notes = region_notes + image_notes(segmenter)
    if pixel_size_um is None and segmenter.meta.pixel_size_um:
        notes.append(unknown_pixel_size_note(segmenter.meta.pixel_size_um, "The file records",
                                             "enter it under 'pixel size' (0.5 at 20x) and segment again."))
    result = ImageResult(name or file_stem(path), display_rgb(image), class_map, instances, classes, colors, table,
                         pixel_size_um, results_folder(), notes=notes, origin=origin)
    stem, folder = result.name, result.folder
    result.downloads = [
        write_label_map(folder / f"{stem}_labels.tif", class_map, pixel_size_um,
                        label_record("classes", classes, colors, origin)),
        write_label_map(folder / f"{stem}_instances.tif", instances, pixel_size_um,
                        label_record("instances", classes, colors, origin, votes)),
        write_geojson(folder / f"{stem}_nuclei.geojson", instances, votes, classes, colors, origin or (0, 0)),
        write_csv(folder / f"{stem}_nuclei.csv", table),
    ]
    return result


@dataclass
class Uploads:
    """What a run made: the results by name, and the files it could not use, with why."""

    results: dict[str, ImageResult]
    refused: dict[str, str] = field(default_factory=dict)


def segment_uploads(store: ModelStore, model_name: str, paths: list[str], threshold: float | None = None,
                    tta: bool = False, pixel_size_um: float | None = None, progress_for=None,
                    region: str | None = None, nucleus_settings: dict | None = None,
                    should_cancel=None) -> Uploads:
    """Every upload through one model, one run at a time (``store.lock``); ``progress_for(label)``
    gives each file its ``(done, total)`` callback. A file that cannot be used is listed in
    ``refused`` and the others go on; if none can be, the first one's error is raised.
    ``should_cancel``: checked between steps (the visitor cancelled or left)."""
    if not paths:
        raise WebInputError("Upload an image (or pick a sample) first.")
    checked_pixel_size(pixel_size_um)  # a typo refuses the run before any file is read
    done = Uploads({})
    first_error: MedsegError | None = None
    try:
        with store.lock:
            segmenter = store.get(model_name)
            for i, path in enumerate(paths, 1):
                progress = None if progress_for is None else progress_for(f"[{i}/{len(paths)}] {Path(path).name}")
                name, copy = file_stem(path), 2
                while name in done.results:  # patch.png and patch.tif, or two patch.png: both kept, told apart
                    name, copy = f"{file_stem(path)} ({copy})", copy + 1
                try:
                    done.results[name] = segment_upload(path, segmenter, threshold, tta, pixel_size_um, progress,
                                                        region, nucleus_settings, name, should_cancel)
                except Cancelled:
                    raise
                except MedsegError as exc:
                    done.refused[Path(path).name] = str(exc)
                    first_error = first_error or exc
    except BaseException:
        # cancelled (or failed) halfway through a batch: the page shows none of it, so the images
        # already done leave no download folders behind until the server stops
        remove_results(done.results)
        raise
    if not done.results:
        raise first_error
    return done


def nucleus_summary(result: ImageResult) -> list[list]:
    """Rows ``class, nuclei, mean area, total area`` (µm² with a pixel size, px otherwise), then all."""
    column = "area_um2" if "area_um2" in result.table else "area"
    names = np.asarray(result.table.get("class", np.array([], object))).astype(str)
    areas = np.asarray(result.table[column], float)
    rows = []
    for name in result.classes[1:]:
        mine = areas[names == name]
        rows.append([name, int(mine.size), _round(mine.mean()) if mine.size else "-", _round(mine.sum())])
    rows.append(["all nuclei", int(areas.size), _round(areas.mean()) if areas.size else "-", _round(areas.sum())])
    return rows


def _round(value: float) -> float:
    return float(np.round(value, 1))


@dataclass
class Comparison:
    report: dict
    errors: np.ndarray  # TP / FP / FN / wrong class per pixel (evaluation.error_maps)
    metrics_csv: Path


def compare_upload(result: ImageResult, gt_path: str | Path) -> Comparison:
    """Score ``result`` against an uploaded ground-truth label map (class map, mask or instances)."""
    labels = read_label_map(gt_path)
    (y, x), (height, width) = result.origin or (0, 0), result.class_map.shape
    if result.origin is not None and labels.shape[0] >= y + height and labels.shape[1] >= x + width:
        labels = labels[y:y + height, x:x + width]  # a region's result against its part of the whole image's
    if labels.shape != result.class_map.shape:
        raise WebInputError(f"The ground truth '{Path(gt_path).name}' is {labels.shape[0]}x{labels.shape[1]} px but "
                            f"the image '{result.name}' is {result.class_map.shape[0]}x{result.class_map.shape[1]}.")
    truth = ground_truth_from_label_map(labels, result.classes)
    report = compare_to_ground_truth(result.class_map, result.classes, truth, pred_instances=result.instances)
    pred = (result.class_map > 0).astype(np.uint8) if report["classes_merged"] else result.class_map
    errors = error_map(truth.class_map, pred, len(report["classes"]))
    path = write_csv(result.folder / f"{result.name}_metrics.csv",
                     metrics_columns(report, result.name, Path(gt_path).name))
    result.comparison = Comparison(report, errors, path)
    return result.comparison


def metrics_rows(report: dict) -> list[list]:
    """The page's table: one row per foreground class, then the nucleus-level row."""
    rows = [[name, *(_cell(row[k]) for k in ("iou", "dice", "precision", "recall", "pq", "f1"))]
            for name, row in list(report["per_class"].items())[1:]]
    o = report["overall"]
    rows.append(["nuclei (all classes)", "-", _cell(o["nucleus_dice"]), "-", "-", _cell(o["bpq"]), _cell(o["f1"])])
    return rows


METRIC_HEADERS = ["class", "IoU", "Dice", "precision", "recall", "PQ", "F1"]


def metrics_columns(report: dict, image: str = "", ground_truth: str = "") -> dict[str, np.ndarray]:
    """The metrics CSV: what was compared (the image, the ground truth's file, how classes were
    scored: a CSV read later must say it), then one row per number."""
    o = report["overall"]
    said = [("image", image), ("ground truth", ground_truth)] if image or ground_truth else []
    if report.get("note"):
        said.append(("note", report["note"]))
    names = ["nucleus Dice", "mIoU", "pixel accuracy", "bPQ", "mPQ", "F1", "AJI"]
    keys = ["nucleus_dice", "miou", "pixel_accuracy", "bpq", "mpq", "f1", "aji"]
    for name, row in list(report["per_class"].items())[1:]:
        for k in ("iou", "dice", "precision", "recall", "pq", "f1"):
            names.append(f"{name} {k}")
            keys.append((name, k))
    values = [o[k] if isinstance(k, str) else report["per_class"][k[0]][k[1]] for k in keys]
    names, values = [n for n, _ in said] + names, [v for _, v in said] + [float(v) for v in values]
    return {"metric": np.array(names, object), "value": np.array(values, object)}


def _cell(value) -> float | str:
    return "-" if value is None or value != value else float(np.round(value, 4))
