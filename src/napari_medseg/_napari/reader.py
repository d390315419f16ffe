"""Reader contribution: images, dataset folders and PanNuke folds by drag-and-drop or File > Open."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.dataset import is_dataset_folder, open_dataset
from ..io.images import IMAGE_SUFFIXES, file_stem, read_image
from ..io.lazy import open_tiff_lazy, should_open_lazily
from ..io.pannuke import PANNUKE_CLASSES, is_pannuke_fold, read_pannuke_fold
from .layers import class_labels_kwargs, image_kwargs, instance_labels_kwargs


def get_reader(path):
    """Return a reader for ``path``, or None if it is not ours."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if all(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in paths):
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
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return read_image_files
    return None


def read_image_files(path) -> list[tuple]:
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    layers = []
    for p in paths:  # read all first: a bad file adds no layer at all
        if should_open_lazily(p):  # whole slides: lazy, and multiscale when the file has a pyramid
            levels = open_tiff_lazy(p)
            data = levels if len(levels) > 1 else levels[0]
            layers.append((data, image_kwargs(file_stem(p), levels[0], multiscale=len(levels) > 1), "image"))
            continue
        image = read_image(p)
        layers.append((image, image_kwargs(file_stem(p), image), "image"))
    return layers


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
