"""Reader contribution: images, whole slides, label maps, dataset folders and PanNuke folds by
drag-and-drop or File > Open."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from ..io.dataset import CLASSES_FILE, DatasetError, is_dataset_folder, open_dataset, read_classes
from ..io.images import (IMAGE_SUFFIXES, LABEL_NAME_ENDINGS, LABEL_SUFFIXES, file_stem, read_image, read_label_map,
                         read_label_record)
from ..io.pannuke import PANNUKE_CLASSES, PANNUKE_PIXEL_SIZE_UM, is_pannuke_fold, read_pannuke_fold
from ..io.pixel_size import file_pixel_size_um
from ..io.slide_outputs import recorded_classes
from ..io.slides import SLIDE_SUFFIXES, is_slide_path, open_slide
from .common import CLASS_ID_LIMIT
from .layers import METADATA_KEY, class_labels_kwargs, image_kwargs, instance_labels_kwargs, with_origin


def get_reader(path):
    """Return a reader for ``path``, or None if it is not ours."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if all(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES for p in paths):
            return read_image_files
        return get_reader(path[0]) if len(paths) == 1 else None
    p = Path(path)
    if p.is_dir():
        if is_dataset_folder(p):
            return read_dataset_folder
        if is_pannuke_fold(p):
            return read_pannuke
        return read_image_folder if _image_files(p) else None
    if p.suffix.lower() == ".npy":
        return read_pannuke if is_pannuke_fold(p) else None
    if p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES:
        return read_image_files
    return None


# a label map drawn or exported by hand: few distinct values (an image has hundreds)
LABEL_MAX_VALUES = 64
LABEL_FOLDERS = ("labels", "instances", "masks")


# a plain folder opens as one layer per image file; more than this is a dataset to train or
# predict on (`medseg predict FOLDER`), not to open at once (each file is read whole)
FOLDER_MAX_IMAGES = 32


def _image_files(folder: Path) -> list[Path]:
    """The image and slide files directly in ``folder``, by name (hidden files left out)."""
    suffixes = IMAGE_SUFFIXES + SLIDE_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in suffixes)


def read_image_folder(path) -> list[tuple]:
    """A plain folder of images (no labels/ beside them, not a PanNuke fold): each file a layer of
    its own, as if they had been dropped together (napari had said only that no reader was found)."""
    files = _image_files(Path(path))
    if len(files) > FOLDER_MAX_IMAGES:
        raise ValueError(f"'{Path(path).name}' holds {len(files)} images; napari-medseg opens up to "
                         f"{FOLDER_MAX_IMAGES} of a folder at once. Open a few of them, or segment the folder with "
                         f"`medseg predict {path} --out RESULTS` (or train on it as a dataset folder with "
                         "images/ and labels/).")
    return read_image_files(files)


def read_image_files(path) -> list[tuple]:
    """One layer per file: a multiscale image for a slide, Labels for a label map, else an image."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    layers = []
    for p in paths:  # read all first: a bad file adds no layer at all
        if is_slide_path(p):
            # a label map by its name or folder, or as this plugin wrote it (its record says what it is)
            labels = _named_as_labels(p) or read_label_record(p) is not None
            layers.append(_slide_labels_layer(p) if labels else _slide_layer(p))
            continue
        labels, pixels = _label_map_or_pixels(p)
        if labels is not None:
            layers.append(_labels_layer(p, labels))
            continue
        image = pixels if pixels is not None else read_image(p)  # read once (it is on napari's GUI thread)
        size = file_pixel_size_um(p)  # a TIFF's believable µm/px, else None
        extra = {**_scale_kwargs(size), "metadata": {"pixel_size_um": size}} if size else {}
        layers.append((image, image_kwargs(file_stem(p), image, **extra), "image"))
    return layers


def _slide_layer(path: Path) -> tuple:
    """Every pyramid level lazily; the pixel size (µm) as the layer's scale and in its metadata."""
    slide = open_slide(path)
    size, extra = slide.pixel_size_um, _scale_kwargs(slide.pixel_size_um)
    metadata = {"slide": {"path": str(slide.path), "pixel_size_um": size, "vendor": slide.vendor,
                          "level_shapes": [tuple(level.shape) for level in slide.levels]}}
    if slide.origin != (0, 0):  # cropped to its scanned bounds (OpenSlide, as QuPath): where it lies in the file
        metadata["slide"]["origin_xy"] = list(slide.origin)
    levels = display_levels(slide.levels, path.name, in_background=True)
    data = levels if len(levels) > 1 else levels[0]
    return data, image_kwargs(file_stem(path), slide.levels[0], multiscale=len(levels) > 1,
                              metadata=metadata, **extra), "image"


# napari draws a big single-level image from the whole plane (copies of it, several GB for a
# large TIFF); given coarser levels it reads only what the view shows, at the level it needs
DISPLAY_MAX_SIDE = 4096


def display_levels(levels: list, name: str = "", in_background: bool = False) -> list:
    """``levels`` for display: while the coarsest is larger than ``DISPLAY_MAX_SIDE``, a lazy
    level of every 2nd pixel of it is added. The coarsest level, which napari draws first, is read
    here (and kept, lazily wrapped): a part of the file that does not decode fails now, before
    any layer is added.

    A level made so (of a large flat TIFF) needs all of the file read: 1-7 s for a 20000² RGB
    one, which napari's File > Open spent on its GUI thread. With ``in_background`` (an image's
    levels; a label pyramid's overview names its classes at once) it is read in a thread instead
    (``_fill_in_background``): the layer is added at once, its overview drawn as the rows come;
    a corner of the full resolution is read here, so a file whose bytes do not decode fails now."""
    import dask.array as da

    levels, made = list(levels), len(levels)
    while max(levels[-1].shape[:2]) > DISPLAY_MAX_SIDE:
        levels.append(levels[-1][::2, ::2])
    if in_background and len(levels) > made and _has_event_loop():
        np.asarray(levels[0][:1, :1]), np.asarray(levels[0][-1:, -1:])  # the first and last strip or tile decode
        # a numpy array, filled in place: napari's dask cache would keep a dask array's first (blank) read
        coarse = np.zeros(levels[-1].shape, levels[-1].dtype)
        _fill_in_background(levels[-1], coarse, name)
        levels[-1] = coarse
        return levels
    levels[-1] = da.from_array(np.asarray(levels[-1]), name=False)
    return levels


OVERVIEW_BAND_ROWS = 128  # rows of the overview read at a time (each a redraw's worth)


def _has_event_loop() -> bool:
    """Whether a Qt application runs (napari's): a script's reader call without one reads at once."""
    try:
        from qtpy.QtWidgets import QApplication
    except Exception:  # no Qt binding
        return False
    return QApplication.instance() is not None


def _fill_in_background(level, coarse: np.ndarray, name: str) -> None:
    """Read ``level`` (lazy) into ``coarse`` band by band in a thread; the layers drawing ``coarse``
    are redrawn (on the GUI thread) as bands come, and an error is shown naming the file."""
    from napari.qt.threading import create_worker

    def read():
        for top in range(0, coarse.shape[0], OVERVIEW_BAND_ROWS):
            coarse[top:top + OVERVIEW_BAND_ROWS] = np.asarray(level[top:top + OVERVIEW_BAND_ROWS])
            yield top
        return None

    worker = create_worker(read, _start_thread=False)
    last, seen = [0.0], [False]

    def refresh(final: bool = False):
        import time

        now = time.monotonic()
        if not final and now - last[0] < 0.5:  # a redraw at most every half second
            return
        last[0] = now
        layers = _layers_drawing(coarse)
        if seen[0] and not layers:  # the layer was closed: the rest is not read
            worker.quit()
        seen[0] = seen[0] or bool(layers)
        for layer in layers:
            forget = getattr(layer, "_reset_thumbnail_level_data", None)  # napari >= 0.6 keeps the overview it read
            if forget is not None:
                forget()
            layer.refresh()
            if final and layer.dtype != np.uint8:  # napari set them from the unread (zero) overview
                layer.reset_contrast_limits_range()
                layer.reset_contrast_limits()

    def failed(exc):
        from napari.utils.notifications import show_error

        show_error(f"The overview of '{name}' could not be read: {exc}")

    worker.yielded.connect(lambda _: refresh())
    worker.returned.connect(lambda _: refresh(final=True))
    worker.errored.connect(failed)
    from qtpy.QtCore import QTimer

    # once napari has added the layer (File > Open returns first): the thread would otherwise
    # take the CPU and the interpreter from napari's first drawing of it
    QTimer.singleShot(0, worker.start)


def _layers_drawing(coarse: np.ndarray) -> list:
    """The image layers (of every open viewer) whose coarsest level is ``coarse``."""
    from napari.layers import Image
    from napari.viewer import Viewer

    return [layer for viewer in list(getattr(Viewer, "_instances", ())) for layer in viewer.layers
            if isinstance(layer, Image) and layer.multiscale and layer.data[-1] is coarse]


def _slide_labels_layer(path: Path) -> tuple:
    """A label pyramid (as ``medseg predict SLIDE`` writes it): multiscale Labels, lazily."""
    slide = open_slide(path)
    if slide.levels[0].ndim != 2 or not np.issubdtype(slide.levels[0].dtype, np.integer):
        return _slide_layer(path)
    levels = display_levels(slide.levels)
    data, extra = (levels if len(levels) > 1 else levels[0]), _scale_kwargs(slide.pixel_size_um)
    recorded = None if _is_instance_path(path) else recorded_classes(path)
    record = read_label_record(path)
    if record is not None:  # saved by this plugin's writer (a large layer): what it was, where it was
        kwargs = _recorded_labels_kwargs(_label_layer_name(path), record, extra)
    elif _is_instance_path(path):
        kwargs = instance_labels_kwargs(_label_layer_name(path), **extra)
    elif recorded is not None:  # a slide run's: its model's classes and colours, every one named
        kwargs = class_labels_kwargs(_label_layer_name(path), recorded["classes"], recorded["colors"], **extra)
    else:  # class names from a dataset's classes.json, else numbered up to the highest id (coarsest level)
        top = int(np.asarray(levels[-1]).max(initial=0))
        kwargs = class_labels_kwargs(_label_layer_name(path), _class_names(path, top), **extra)
    return data, {**kwargs, "multiscale": len(levels) > 1}, "labels"


def _scale_kwargs(size: float | None) -> dict:
    """The layer's scale in µm per pixel, where the file records it (napari's scale bar then reads
    µm, and Segment sees the image at its model's pixel size)."""
    return {"scale": (size, size), "units": ("micrometer", "micrometer")} if size else {}


def _named_as_labels(path: Path) -> bool:
    return path.parent.name.lower() in LABEL_FOLDERS or file_stem(path).lower().endswith(LABEL_NAME_ENDINGS)


def _label_layer_name(path: Path) -> str:
    """A label file's layer name: its stem, and the folder that says what it is where the stem does
    not ('train_1_005 labels', 'train_1_005 instances'): a dataset's image, class map and nuclei
    share one stem, and napari had named them 'train_1_005', 'train_1_005 [1]', 'train_1_005 [2]'."""
    stem, folder = file_stem(path), path.parent.name
    if folder.lower() in LABEL_FOLDERS and not stem.lower().endswith(LABEL_NAME_ENDINGS):
        return f"{stem} {folder}"
    return stem


def _is_instance_path(path: Path) -> bool:
    return path.parent.name.lower() == "instances" or file_stem(path).lower().endswith("_instances")


def _label_map_or_pixels(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(label map, None)`` if the file is one: named or filed as one, or a 2-D integer map with
    few distinct values; else ``(None, the pixels if they were read to decide)``."""
    if path.suffix.lower() not in LABEL_SUFFIXES:
        return None, None
    if read_label_record(path) is not None:  # saved from a Labels layer by this plugin
        return read_label_map(path), None
    pixels = read_image(path) if not _named_as_labels(path) else None
    # 32- and 64-bit integers are ids, not a camera's counts: napari's own labels TIFF (the save
    # dialog's first choice) of thousands of nuclei had reopened as a gray image
    wide_ids = pixels is not None and pixels.ndim == 2 and pixels.dtype.kind in "iu" and pixels.dtype.itemsize >= 4
    if pixels is not None and not wide_ids and (pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer)
                                                or len(np.unique(pixels)) > LABEL_MAX_VALUES):
        return None, pixels
    return read_label_map(path), None


def _labels_layer(path: Path, labels: np.ndarray) -> tuple:
    name, top = _label_layer_name(path), int(labels.max(initial=0))
    extra = _scale_kwargs(file_pixel_size_um(path))  # on its image, where both record their pixel size
    record = read_label_record(path)
    if record is not None:  # saved by this plugin's writer: what the layer was, where it was
        kwargs = _recorded_labels_kwargs(_label_layer_name(path), record, extra)
        return (labels if record.get("classes") and record.get("kind") != "instances" else _paintable(labels),
                kwargs, "labels")
    # ids beyond any class map's (a '_labels' file that holds nuclei): an instance map, else a
    # name and colour per id would be made for up to millions of ids
    if _is_instance_path(path) or top >= CLASS_ID_LIMIT:
        return _paintable(labels), instance_labels_kwargs(name, **extra), "labels"
    return labels, class_labels_kwargs(name, _class_names(path, top), **extra), "labels"


def _paintable(ids: np.ndarray) -> np.ndarray:
    """A map of nuclei (or of ids painted by hand) in 32 bits, as Segment makes them: a file
    stores it in the fewest bits, and in 8 napari refuses to paint a new nucleus past id 255."""
    return ids.astype(np.int32) if ids.dtype.itemsize == 1 else ids


def _recorded_labels_kwargs(name: str, record: dict, extra: dict) -> dict:
    """A saved layer's kind, classes, colours and nuclei's classes, back in its layer settings; a
    region's result at its origin in its image (at the image's scale)."""
    classes, colors = record.get("classes"), record.get("colors")
    if record.get("kind") == "instances":
        kwargs = instance_labels_kwargs(name, classes, colors, record.get("instance_classes"), **extra)
    elif classes:
        kwargs = class_labels_kwargs(name, classes, colors, **extra)
    else:  # a Labels layer made by hand: as napari shows one (a class map without names had every id hidden)
        kwargs = {"name": name, "metadata": {METADATA_KEY: {}}, **extra}
    origin = record.get("origin")
    if origin is not None:
        if any(origin):
            sy, sx = extra.get("scale", (1.0, 1.0))
            kwargs["translate"] = (origin[0] * sy, origin[1] * sx)
        with_origin(kwargs, tuple(origin), record.get("polygon"))
    return kwargs


def _class_names(path: Path, top: int) -> list[str]:
    """The dataset's class names, numbered names for any id above them (up to ``top``)."""
    classes = _dataset_classes(path) or ["background"]
    return classes + [f"class {i}" for i in range(len(classes), top + 1)]


def _dataset_classes(path: Path) -> list[str] | None:
    """Class names from the ``classes.json`` of the dataset folder a label file sits in."""
    for root in (path.parent, path.parent.parent):
        if (root / CLASSES_FILE).is_file():
            try:
                return read_classes(root)[0]
            except DatasetError:
                return None
    return None


# a few images of a dataset open at once, each as its own image, ground truth and instances:
# hundreds of patches as ~1300 layers would bury the viewer (and a stack cannot be segmented)
DATASET_OPEN_LIMIT = 4


def read_dataset_folder(path) -> list[tuple]:
    """The first ``DATASET_OPEN_LIMIT`` images, each with its class and instance maps as layers
    named by its stem; the first set shown and on top, the others hidden under it. A notification
    says what was left."""
    ds = open_dataset(path)
    stems = ds.stems[:DATASET_OPEN_LIMIT]
    samples = [ds.load(stem) for stem in stems]  # all read first: a bad file adds no layer at all
    # the shown image last, so that it is on top and its ground truth the layer napari selects (it
    # selects the last one added: a hidden one had taken the first brush stroke)
    layers = [layer for i, s in reversed(list(enumerate(samples))) for layer in _sample_layers(ds, s, visible=i == 0)]
    if len(ds.stems) > len(stems):
        _notify_left_out(ds, stems)
    return layers


def _sample_layers(ds, sample, visible: bool) -> list[tuple]:
    """One image of a dataset folder: its image, class map and instance map, named by its stem, in
    µm where the image file records its pixel size (as when the image is opened alone: Segment
    then sees it at its model's pixel size, as ``medseg predict`` on the folder does)."""
    metadata = {"dataset": str(ds.root), "stem": sample.stem}
    size = file_pixel_size_um(ds.image_paths[sample.stem])
    extra = _scale_kwargs(size)
    if size:
        metadata["pixel_size_um"] = size
    layers = [(sample.image, image_kwargs(sample.stem, sample.image, visible=visible, metadata=metadata, **extra),
               "image")]
    if sample.instances is not None:  # hidden, so under the ground truth (see read_dataset_folder)
        kwargs = instance_labels_kwargs(f"{sample.stem} instances", visible=False, **extra)
        layers.append((_paintable(sample.instances), kwargs, "labels"))
    if sample.labels is not None:
        kwargs = class_labels_kwargs(f"{sample.stem} ground truth", ds.classes, visible=visible, **extra)
        layers.append((sample.labels, kwargs, "labels"))
    return layers


def _notify_left_out(ds, opened: list[str]) -> None:
    from napari.utils.notifications import show_info

    rest = len(ds.stems) - len(opened)
    show_info(f"Opened {len(opened)} of the {len(ds.stems)} images of '{ds.root.name}' ({', '.join(opened)}); "
              f"{rest} more not opened. To open another, drag in its image from images/, then its "
              "labels/ and instances/ .tif files (or open a folder holding only the images you want).")


def read_pannuke(path) -> list[tuple]:
    """A fold as a lazy image stack plus lazily derived class and instance maps."""
    import dask.array as da

    fold = read_pannuke_fold(path)
    n, h, w = fold.images.shape[:3]
    name = f"PanNuke {fold.root.name}"

    def maps(index: int, which: int) -> np.ndarray:
        return fold.class_and_instance_maps(index)[which]

    # every task named here: dask would otherwise hash each call's function, whose closure holds
    # the fold's memory maps, by pickling them whole (a 40-image fold took 98 s to open, and a
    # real fold of ~2600 images never opened)
    token = uuid.uuid4().hex
    task = _delayed(maps, f"pannuke-maps-{token}")
    classes = da.stack([da.from_delayed(task(i, 0, dask_key_name=f"pannuke-classes-{token}-{i}"), (h, w), np.uint8)
                        for i in range(n)])
    instances = da.stack([da.from_delayed(task(i, 1, dask_key_name=f"pannuke-instances-{token}-{i}"), (h, w),
                                          np.int32) for i in range(n)])
    images = da.from_array(fold.images, chunks=(1, h, w, 3)).astype(np.uint8)
    return [
        # the pixel size in metadata, not in scale: µm beside the stack's unit-less patch axis is
        # a mix napari's scale bar and the plane slider do not expect; Segment and Objects read it
        (images, image_kwargs(name, images, rgb=True, metadata={"tissues": fold.tissues,
                                                                "pixel_size_um": PANNUKE_PIXEL_SIZE_UM}), "image"),
        (instances, instance_labels_kwargs(f"{name} instances", visible=False), "labels"),
        (classes, class_labels_kwargs(f"{name} ground truth", PANNUKE_CLASSES), "labels"),  # last: selected
    ]


def _delayed(func, name: str):
    import dask

    return dask.delayed(func, name=name, pure=True)
