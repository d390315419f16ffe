"""Mixed label sets: dataset folders with classes and folders with nucleus / background only.

``data.datasets`` lists dataset folders, each with its label kind, sampling weight and how far
its instance maps are trusted for the distance head (``config.DatasetSpec``):

* A *class* set (CoNSeP) keeps its class ids; every class set must share one class list.
* A *binary* set (MoNuSeg, TNBC) knows only nucleus vs background. Its pixels are coded
  ``BINARY_NUCLEUS`` / ``BINARY_BACKGROUND`` (values no class id takes), so augmentation and
  padding carry them like any label and the loss (``losses.MixedLabels``) tells them apart per
  pixel: they train ``p(nucleus) = 1 - p(background)``, the summed nucleus class
  probabilities, and never the split between the nucleus classes.
* The split into training and validation images is made per set, by source image (the folder's
  ``group_pattern``: CoNSeP ``train_<image>``, TNBC ``tnbc_<slide>``; each MoNuSeg image is
  its own TCGA case), so every set is validated on its own held-out images.
* ``weight``: each epoch draws its crops from the sets in proportion to their weights (with
  replacement), whatever their sizes; within a set every crop is equally likely.

Distance trust. TNBC's instances are connected components of a binary mask, so touching nuclei
may be one component, whose distance map has one peak where there should be two. ``convex``
keeps the distance loss only on components of solidity (area / convex-hull area) >= 0.85:
measured on the sets here, MoNuSeg's and CoNSeP's hand-drawn nuclei fall below it at 3.8 % and
8.8 %, TNBC's components at 4.3 % (their distribution is close to MoNuSeg's: few merges), so
this drops the likely merges at the cost of a few per cent of single nuclei. Their
background pixels and class / nucleus labels are trusted as given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.dataset import DatasetError, open_dataset
from ..io.images import to_rgb_float
from .config import DatasetSpec
from .data import LabelledImage, check_dataset_exists, split_by_group

BINARY_BACKGROUND = 254  # a binary set's background pixel
BINARY_NUCLEUS = 255  # a binary set's nucleus pixel: some nucleus class, which one unknown
MIN_SOLIDITY = 0.85  # ``convex`` distance trust: components below it may be merged nuclei


def set_name(spec: DatasetSpec) -> str:
    """How items, validation figures and sampling weights name a set: its folder's name."""
    return Path(spec.path).resolve().name


def nucleus_mask(item: LabelledImage) -> np.ndarray:
    """Where ``item`` has a nucleus (any class, or a binary set's nucleus code)."""
    labels = item.labels
    return labels == BINARY_NUCLEUS if item.binary else labels > 0


def untrusted_nuclei(instances: np.ndarray, trust: str) -> np.ndarray:
    """The pixels whose distance target is not trusted under ``trust`` (DatasetSpec.distance)."""
    if trust == "all":
        return np.zeros(instances.shape, bool)
    if trust == "none":
        return instances > 0
    from skimage.measure import regionprops

    low = [r.label for r in regionprops(instances) if r.solidity < MIN_SOLIDITY]
    return np.isin(instances, low)


def load_mixed_sets(specs: list[DatasetSpec], group_pattern: str, in_channels: int = 3,
                    ) -> tuple[list[LabelledImage], list[str]]:
    """The labelled images of every set in ``specs`` and the class list they train.

    The classes are the class sets' (which must agree); with binary sets only, background and
    nucleus. A binary set's labels become nucleus / background codes.
    """
    names = [set_name(spec) for spec in specs]
    if len(set(names)) < len(names):
        raise DatasetError(f"data.datasets: two folders share a name ({', '.join(names)}); "
                           "validation reports sets by folder name, so give them different names.")
    folders = []
    for spec in specs:
        check_dataset_exists(spec.path, "data.datasets")
        folders.append((spec, open_dataset(spec.path, require_labels=True)))
    classes = None
    for spec, folder in folders:
        if spec.labels == "classes":
            if classes is not None and folder.classes != classes:
                raise DatasetError(f"{folder.root} has classes {folder.classes}, but the first class set has "
                                   f"{classes}. Give it 'labels: binary' to train only its nuclei.")
            classes = classes or list(folder.classes)
    items = [_item(spec, folder, stem, group_pattern, in_channels) for spec, folder in folders for stem in folder.stems]
    if not items:
        raise DatasetError(f"No labelled images in {', '.join(spec.path for spec in specs)}.")
    return items, classes or ["background", "nucleus"]


def _item(spec: DatasetSpec, folder, stem: str, group_pattern: str, in_channels: int) -> LabelledImage:
    sample = folder.load(stem)
    binary = spec.labels == "binary"
    labels = np.where(sample.labels > 0, BINARY_NUCLEUS, BINARY_BACKGROUND) if binary else sample.labels
    return LabelledImage(stem, f"{set_name(spec)}/{folder.group(stem, group_pattern, prefixed=False)}",
                         to_rgb_float(sample.image, in_channels), labels.astype(np.uint8), sample.instances,
                         dataset=set_name(spec), binary=binary, distance_trust=spec.distance,
                         pixel_size_um=sample.pixel_size_um)


def split_each_set(items: list[LabelledImage], val_fraction: float, seed: int) -> tuple[list, list]:
    """``split_by_group`` within each set: every set keeps its own held-out source images (a
    set of one source image trains only)."""
    train, val = [], []
    for name in dict.fromkeys(it.dataset for it in items):
        members = [it for it in items if it.dataset == name]
        if len({it.group for it in members}) < 2:
            train += members
            continue
        t, v = split_by_group(members, val_fraction, seed)
        train, val = train + t, val + v
    return train, val


def sampling_weights(items: list[LabelledImage], index: list[int], specs: list[DatasetSpec]) -> list[float]:
    """A weight per entry of ``index`` (the epoch's crops, as item indices): each set's entries
    share its ``weight``, so sets are drawn in proportion to their weights whatever their sizes."""
    by_name = {set_name(spec): spec.weight for spec in specs}
    counts: dict[str, int] = {}
    for i in index:
        counts[items[i].dataset] = counts.get(items[i].dataset, 0) + 1
    return [by_name[items[i].dataset] / counts[items[i].dataset] for i in index]
