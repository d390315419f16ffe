"""Reader contribution: images, whole slides, label maps, dataset folders and PanNuke folds by
drag-and-drop or File > Open."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.dataset import CLASSES_FILE, DatasetError, is_dataset_folder, open_dataset, read_classes
from ..io.images import IMAGE_SUFFIXES, LABEL_SUFFIXES, file_stem, read_image, read_label_map
from ..io.pannuke import PANNUKE_CLASSES, is_pannuke_fold, read_pannuke_fold
from ..io.slides import SLIDE_SUFFIXES, is_slide_path, open_slide
from .layers import class_labels_kwargs, image_kwargs, instance_labels_kwargs


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
        return None
    if p.suffix.lower() == ".npy":
        return read_pannuke if is_pannuke_fold(p) else None
    if p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES:
        return read_image_files
    return None


# a label map drawn or exported by hand: few distinct values (an image has hundreds)
LABEL_MAX_VALUES = 64
LABEL_NAME_ENDINGS = ("_labels", "_label", "_mask", "_masks", "_instances")
LABEL_FOLDERS = ("labels", "instances", "masks")


def read_image_files(path) -> list[tuple]:
    """One layer per file: a multiscale image for a slide, Labels for a label map, else an image."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    layers = []
    for p in paths:  # read all first: a bad file adds no layer at all
        if is_slide_path(p):
            layers.append(_slide_labels_layer(p) if _named_as_labels(p) else _slide_layer(p))
            continue
        labels = _label_map_or_none(p)
        if labels is not None:
            layers.append(_labels_layer(p, labels))
            continue
        image = read_image(p)
        layers.append((image, image_kwargs(file_stem(p), image), "image"))
    return layers


def _slide_layer(path: Path) -> tuple:
    """Every pyramid level lazily; the pixel size (µm) as the layer's scale and in its metadata."""
    slide = open_slide(path)
    size, extra = slide.pixel_size_um, _scale_kwargs(slide)
    metadata = {"slide": {"path": str(slide.path), "pixel_size_um": size, "vendor": slide.vendor,
                          "level_shapes": [tuple(level.shape) for level in slide.levels]}}
    data = slide.levels if len(slide.levels) > 1 else slide.levels[0]
    return data, image_kwargs(file_stem(path), slide.levels[0], multiscale=len(slide.levels) > 1,
                              metadata=metadata, **extra), "image"


def _slide_labels_layer(path: Path) -> tuple:
    """A label pyramid (as ``medseg predict SLIDE`` writes it): multiscale Labels, lazily."""
    slide = open_slide(path)
    if slide.levels[0].ndim != 2 or not np.issubdtype(slide.levels[0].dtype, np.integer):
        return _slide_layer(path)
    data, extra = (slide.levels if len(slide.levels) > 1 else slide.levels[0]), _scale_kwargs(slide)
    if _is_instance_path(path):
        kwargs = instance_labels_kwargs(file_stem(path), **extra)
    else:  # class names from a dataset's classes.json, else numbered up to the highest id (coarsest level)
        top = int(np.asarray(slide.levels[-1]).max(initial=0))
        kwargs = class_labels_kwargs(file_stem(path), _class_names(path, top), **extra)
    return data, {**kwargs, "multiscale": len(slide.levels) > 1}, "labels"


def _scale_kwargs(slide) -> dict:
    """The layer's scale in µm per pixel, where the slide records it (napari's scale bar then reads µm)."""
    size = slide.pixel_size_um
    return {"scale": (size, size), "units": ("micrometer", "micrometer")} if size else {}


def _named_as_labels(path: Path) -> bool:
    return path.parent.name.lower() in LABEL_FOLDERS or file_stem(path).lower().endswith(LABEL_NAME_ENDINGS)


def _is_instance_path(path: Path) -> bool:
    return path.parent.name.lower() == "instances" or file_stem(path).lower().endswith("_instances")


def _label_map_or_none(path: Path) -> np.ndarray | None:
    """The file as a label map if it is one: named or filed as one, or a 2-D integer map with
    few distinct values; None for an image."""
    if path.suffix.lower() not in LABEL_SUFFIXES:
        return None
    pixels = read_image(path) if not _named_as_labels(path) else None
    if pixels is not None and (pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer)
                               or len(np.unique(pixels)) > LABEL_MAX_VALUES):
        return None
    return read_label_map(path)


def _labels_layer(path: Path, labels: np.ndarray) -> tuple:
    name = file_stem(path)
    if _is_instance_path(path):
        return labels, instance_labels_kwargs(name), "labels"
    return labels, class_labels_kwargs(name, _class_names(path, int(labels.max(initial=0)))), "labels"


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


def read_dataset_folder(path) -> list[tuple]:
    """Images (a stack when they share a size) plus their class and instance maps."""
    ds = open_dataset(path)
    samples = [ds.load(stem) for stem in ds.stems]
    name = Path(path).name
    shapes = {s.image.shape for s in samples}
    layers = []
    if len(shapes) == 1:
        groups = [(name, samples)]
    else:  # different sizes cannot share a stack: one set of layers per image
        groups = [(f"{name}/{s.stem}", [s]) for s in samples]
    for label, group in groups:
        images = np.stack([s.image for s in group]) if len(group) > 1 else group[0].image
        layers.append((images, image_kwargs(label, images, metadata={"stems": [s.stem for s in group]}), "image"))
        if all(s.labels is not None for s in group):
            labels = np.stack([s.labels for s in group]) if len(group) > 1 else group[0].labels
            layers.append((labels.astype(np.uint8), class_labels_kwargs(f"{label} ground truth", ds.classes), "labels"))
        if all(s.instances is not None for s in group):
            inst = np.stack([s.instances for s in group]) if len(group) > 1 else group[0].instances
            layers.append((inst, instance_labels_kwargs(f"{label} instances", visible=False), "labels"))
    return layers


def read_pannuke(path) -> list[tuple]:
    """A fold as a lazy image stack plus lazily derived class and instance maps."""
    import dask.array as da

    fold = read_pannuke_fold(path)
    n, h, w = fold.images.shape[:3]
    name = f"PanNuke {fold.root.name}"

    def maps(index: int, which: int) -> np.ndarray:
        return fold.class_and_instance_maps(index)[which]

    classes = da.stack([da.from_delayed(_delayed(maps, i, 0), (h, w), np.uint8) for i in range(n)])
    instances = da.stack([da.from_delayed(_delayed(maps, i, 1), (h, w), np.int32) for i in range(n)])
    images = da.from_array(fold.images, chunks=(1, h, w, 3)).astype(np.uint8)
    return [
        (images, image_kwargs(name, images, rgb=True, metadata={"tissues": fold.tissues}), "image"),
        (classes, class_labels_kwargs(f"{name} ground truth", PANNUKE_CLASSES), "labels"),
        (instances, instance_labels_kwargs(f"{name} instances", visible=False), "labels"),
    ]


def _delayed(func, *args):
    import dask

    return dask.delayed(func, pure=True)(*args)
