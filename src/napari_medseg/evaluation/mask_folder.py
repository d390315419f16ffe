"""A lab's flat export of images and nucleus masks (``b.png`` beside ``b_mask.png``, 0 / 255, or an
instance map) as a dataset folder that ``medseg train`` and ``medseg evaluate`` read: images as
they are, masks as ``labels/<stem>.tif`` (0 / 1), instance maps as ``instances/<stem>.tif``.

Each mask is read as what it most likely is (``ground_truth_from_label_map``: a binary mask, an
instance map, or a class map of unknown classes taken as nucleus vs background), and the summary
says how; every lab had written its own script for this.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.dataset import DatasetError, write_classes
from ..io.images import IMAGE_SUFFIXES, LABEL_NAME_ENDINGS, LABEL_SUFFIXES, file_stem, read_label_map, write_label_map
from .ground_truth import ground_truth_from_label_map
from .report import NUCLEUS_CLASSES


@dataclass
class MaskFolderResult:
    images: int = 0
    readings: Counter = field(default_factory=Counter)  # how the masks were read -> how many
    without_mask: list[str] = field(default_factory=list)  # images left out: no mask beside them
    without_image: list[str] = field(default_factory=list)  # masks left out: no image of their name
    mostly_nucleus: list[str] = field(default_factory=list)  # masks whose nucleus covers most of the image


def _read_mask(image: Path, mask: Path, result: MaskFolderResult):
    """The mask as ground truth, checked against its image (all read before anything is written)."""
    from ..io.images import read_image

    truth = ground_truth_from_label_map(read_label_map(mask), NUCLEUS_CLASSES)
    shape = read_image(image).shape[:2]
    if truth.class_map.shape != shape:  # had been written, then refused by training naming labels/<stem>.tif
        raise DatasetError(f"{mask.name} is {truth.class_map.shape[1]}x{truth.class_map.shape[0]} px but its image "
                           f"{image.name} is {shape[1]}x{shape[0]}: a mask must cover its image pixel for pixel.")
    if (truth.class_map > 0).mean() > INVERTED_SHARE:
        result.mostly_nucleus.append(mask.name)
    return truth


# a mask whose nucleus covers more of its image than this is likelier inverted (nucleus 0)
INVERTED_SHARE = 0.6


def _mask_of(stem: str, files: dict[str, Path]) -> Path | None:
    found = [files[key] for key in (f"{stem}{ending}".lower() for ending in LABEL_NAME_ENDINGS) if key in files]
    if len(found) > 1:  # a_mask.png beside a_labels.png: one had been taken silently
        raise DatasetError(f"{', '.join(p.name for p in found)} are all masks of one image: keep one of them.")
    return found[0] if found else None


def masks_to_dataset(source: str | Path, out_dir: str | Path) -> MaskFolderResult:
    """Write ``source``'s images and their masks (``<stem>_mask``, ``_masks``, ``_labels``,
    ``_label`` or ``_instances``, PNG or TIFF) into the new dataset folder ``out_dir``."""
    source, out = Path(source), Path(out_dir)
    if not source.is_dir():
        raise DatasetError(f"{source} is not a folder of images and masks.")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty: convert into a new folder (nothing there is replaced).")
    files: dict[str, Path] = {}
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            key = file_stem(p).lower()
            if key in files:  # a.png beside A.tif: one had been dropped silently
                raise DatasetError(f"{files[key].name} and {p.name} share a name: keep one of them.")
            files[key] = p
    images = {key: p for key, p in files.items() if not key.endswith(LABEL_NAME_ENDINGS)}
    masks = {key: p for key, p in files.items() if key.endswith(LABEL_NAME_ENDINGS)}
    lossy = [p.name for p in masks.values() if p.suffix.lower() not in LABEL_SUFFIXES]
    if lossy:  # JPEG blurs a mask's values at every edge
        raise DatasetError(f"{', '.join(lossy[:3])}: masks must be PNG or TIFF (JPEG changes their values).")
    if not images:
        raise DatasetError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)}) beside masks.")
    pairs = {key: (p, _mask_of(key, masks)) for key, p in sorted(images.items())}
    used = {mask for _, mask in pairs.values()}
    result = MaskFolderResult(without_mask=[p.name for p, mask in pairs.values() if mask is None],
                              without_image=[p.name for p in masks.values() if p not in used])
    if len(result.without_mask) == len(pairs):
        raise DatasetError(f"None of the {len(pairs)} images in {source} has a mask beside it, named "
                           f"<stem>{' / <stem>'.join(LABEL_NAME_ENDINGS)} (e.g. {next(iter(pairs.values()))[0].stem}"
                           "_mask.png).")
    truths = {image: _read_mask(image, mask, result) for image, mask in pairs.values() if mask is not None}
    # a folder's instances/ holds every image's or none: masks beside instance maps get their
    # connected components (touching nuclei stay one, as TNBC's); masks alone get none, and a run
    # cuts nuclei from them where it needs them
    with_instances = any(truth.instances is not None for truth in truths.values())
    for sub in ("images", "labels") + (("instances",) if with_instances else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for image, truth in truths.items():
        stem = file_stem(image)
        shutil.copy2(image, out / "images" / image.name)  # as it is: its pixel size tags too
        write_label_map(out / "labels" / f"{stem}.tif", (truth.class_map > 0).astype(np.uint8))
        reading = "a class map, its classes merged into nucleus" if truth.reading.startswith("a class map") \
            else truth.reading.split(" (")[0]
        if with_instances:
            instances = truth.instances
            if instances is None:
                from scipy import ndimage as ndi

                instances = ndi.label(truth.class_map > 0)[0]
                reading += " (nuclei: its connected components)"
            write_label_map(out / "instances" / f"{stem}.tif", instances.astype(np.int32))
        result.images += 1
        result.readings[reading] += 1
    write_classes(out, list(NUCLEUS_CLASSES), f"converted by medseg convert masks from {source}")
    return result
