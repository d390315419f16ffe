"""The dataset folder: the one on-disk layout used to train, predict and evaluate.

    <root>/images/<stem>.(png|tif|tiff|jpg|jpeg)   image
    <root>/labels/<stem>.tif                       class map, 0 = background
    <root>/instances/<stem>.tif                    optional instance ids, 0 = background
    <root>/classes.json                            {"classes": [background, ...], "source": "..."}

A folder without ``labels/`` but with ``instances/`` and two classes (e.g. MoNuSeg's
``background, nucleus``) is read as binary: class 1 wherever an instance is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from ..wording import counted
from .images import IMAGE_SUFFIXES, ImageReadError, atomic_write, file_stem, read_image, read_label_map, write_label_map
from .pixel_size import file_pixel_size_um

CLASSES_FILE = "classes.json"
DATASET_FOLDERS = ("images", "labels", "instances")
# stem -> source image: ``<image>_<n>`` is patch n of one image. Splits and validation sets keep
# every patch of one source image on one side (never split by patch).
GROUP_PATTERN = r"^(.*)_\d+$"
# classes.json sources of folders whose every image is its own source image: a converted PanNuke
# fold's patches (``<tissue>_<index>``) come from many slides, none named, so the default
# pattern's ``<tissue>`` would hold out whole tissues (io.pannuke writes this source)
OWN_SOURCE_PREFIXES = ("PanNuke fold",)


class DatasetError(MedsegError, ValueError):
    """A dataset folder is missing parts or its parts disagree."""


@dataclass
class Sample:
    stem: str
    image: np.ndarray
    labels: np.ndarray | None
    instances: np.ndarray | None = None
    group: str = ""  # its source image, where the reader was told (``samples_of_groups``)
    pixel_size_um: float | None = None  # µm/px the image file records (``file_pixel_size_um``), if any


@dataclass
class DatasetFolder:
    root: Path
    classes: list[str]
    stems: list[str]
    source: str = ""
    image_paths: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def has_labels(self) -> bool:
        return (self.root / "labels").is_dir()

    @property
    def has_instances(self) -> bool:
        return (self.root / "instances").is_dir()

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def images_are_own_sources(self) -> bool:
        """Every image is its own source image (``OWN_SOURCE_PREFIXES``): a converted PanNuke fold."""
        return self.source.startswith(OWN_SOURCE_PREFIXES)

    def group(self, stem: str, pattern: str = GROUP_PATTERN, prefixed: bool = True) -> str:
        """The source image of ``stem``, ``<folder name>/<group>`` (``prefixed``) as a training run
        records it: by ``pattern``, except that the default pattern leaves each image of a
        folder of own-source images (``images_are_own_sources``) its own group."""
        group = stem if self.images_are_own_sources and pattern == GROUP_PATTERN else source_group(stem, "", pattern)
        return f"{self.root.name}/{group}" if prefixed else group

    def load(self, stem: str) -> Sample:
        image = read_image(self.image_paths[stem])
        instances = None
        inst_path = self.root / "instances" / f"{stem}.tif"
        if inst_path.is_file():
            instances = read_label_map(inst_path)
        labels = None
        label_path = self.root / "labels" / f"{stem}.tif"
        if label_path.is_file():
            labels = read_label_map(label_path)
        elif instances is not None and len(self.classes) == 2:
            labels = (instances > 0).astype(np.uint8)
        for name, arr in (("labels", labels), ("instances", instances)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise DatasetError(
                    f"{self.root.name}/{name}/{stem}.tif has shape {arr.shape} but its image is {image.shape[:2]}."
                )
        if labels is not None and len(self.classes) == 2 and labels.size and int(labels.max()) > 1 \
                and np.unique(labels).size <= 2:
            # a nucleus mask saved as 0 / 255 (image editors' and most labs' export): nucleus is its one
            # non-zero value; it had been refused as 'class id 255' even under labels: binary
            labels = (labels > 0).astype(np.uint8)
        if labels is not None and labels.size and int(labels.max()) >= len(self.classes):
            raise DatasetError(
                f"{self.root.name}/labels/{stem}.tif holds class id {int(labels.max())}, but classes.json "
                f"lists only {len(self.classes)} classes (ids 0..{len(self.classes) - 1})."
            )
        return Sample(stem, image, labels, instances, pixel_size_um=file_pixel_size_um(self.image_paths[stem]))

    def __iter__(self):
        for stem in self.stems:
            yield self.load(stem)


def source_group(stem: str, folder: str = "", pattern: str = GROUP_PATTERN) -> str:
    """The source image a stem was cut from (the stem itself when ``pattern`` does not match),
    prefixed by its ``folder`` name when given: ``consep_train/train_12`` for ``train_12_003``."""
    match = re.match(pattern, stem)
    group = match.group(1) if match else stem
    return f"{folder}/{group}" if folder else group


# px: the least step between tile coordinates that names like '<slide>_<x>_<y>' carry (tiles are 64² and up)
TILE_STEP_MIN = 64


def tile_row_step(groups: list[str]) -> int:
    """The step of the numbers the source images ``groups`` end in when they look like tile
    coordinates, else 0. Stems ``<slide>_<x>_<y>`` under the default pattern become groups
    ``<slide>_<x>``: one per column of tiles, so one slide's tiles fall on both sides of the split.
    They do when every group ends in ``_<number>``, the numbers share a step of ``TILE_STEP_MIN`` px
    or more (0 included) and fewer names are left without them (CoNSeP's ``train_12``: step 1)."""
    matches = [re.match(r"^(.*)_(\d+)$", g.rsplit("/", 1)[-1]) for g in groups]
    if len(groups) < 2 or not all(matches):
        return 0
    step = math.gcd(*(int(m.group(2)) for m in matches))
    fewer = len({m.group(1) for m in matches}) < len(groups)
    return step if step >= TILE_STEP_MIN and fewer else 0


def is_dataset_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "images").is_dir()


def read_classes(root: Path) -> tuple[list[str], str]:
    file = root / CLASSES_FILE
    if not file.is_file():
        raise DatasetError(f"{root}: missing {CLASSES_FILE} (expected {{\"classes\": [\"background\", ...]}}).")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data["classes"], list):
            # A string would otherwise be split into one class per character.
            raise TypeError(f"'classes' is a {type(data['classes']).__name__}, not a list")
        classes = [str(c) for c in data["classes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{file}: not valid JSON with a 'classes' list ({exc}).") from exc
    if len(classes) < 2:
        raise DatasetError(f"{file}: needs at least two classes (background and one more), got {classes}.")
    return classes, str(data.get("source", ""))


def open_dataset(root: str | os.PathLike, require_labels: bool = False) -> DatasetFolder:
    """Index a dataset folder and check that its parts match (without reading pixels)."""
    root = Path(root)
    if not is_dataset_folder(root):
        raise DatasetError(f"{root} is not a dataset folder: it has no 'images/' subfolder.")
    classes, source = read_classes(root)
    image_paths: dict[str, Path] = {}
    for p in sorted((root / "images").iterdir()):
        # hidden files are no images: macOS's "._<name>" resource forks, our own temp files
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            stem = file_stem(p)
            if stem in image_paths:
                raise DatasetError(f"{root.name}/images: two images share the stem '{stem}'.")
            image_paths[stem] = p
    if not image_paths:
        raise DatasetError(f"{root}/images holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    stems = list(image_paths)
    for sub in ("labels", "instances"):
        folder = root / sub
        if not folder.is_dir():
            continue
        have = {p.stem for p in folder.glob("*.tif") if not p.name.startswith(".")}
        missing = [s for s in stems if s not in have]
        extra = sorted(have - set(stems))
        # near misses: b.TIF, b.tiff, b.ome.tif, b.png for b.tif
        others = sorted(p.name for p in folder.iterdir() if file_stem(p) in missing and p.name != f"{file_stem(p)}.tif")
        # an instances/ folder may be left empty, but not filled with PNGs: they had been passed
        # over, and a folder without labels/ had then failed with a bare AttributeError
        if missing and (sub == "labels" or len(missing) < len(stems) or others):
            hint = (f"; {', '.join(others[:3])} must be saved as .tif (masks are read from <stem>.tif only)"
                    if others else "")
            raise DatasetError(
                f"{root.name}/{sub} lacks masks for {counted(len(missing), 'image')}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "") + hint
            )
        if extra:
            raise DatasetError(
                f"{root.name}/{sub} has {counted(len(extra), 'mask')} without an image: {', '.join(extra[:5])}"
                + (" ..." if len(extra) > 5 else "")
            )
    ds = DatasetFolder(root, classes, stems, source, image_paths)
    if require_labels and not ds.has_labels and not (ds.has_instances and len(classes) == 2):
        raise DatasetError(f"{root} has no 'labels/' folder, which this task needs.")
    return ds


def write_classes(root: Path, classes: list[str], source: str = "") -> None:
    text = json.dumps({"classes": list(classes), "source": source}, indent=1) + "\n"
    atomic_write(root / CLASSES_FILE, lambda tmp: tmp.write_text(text))


def write_sample(root: Path, stem: str, image: np.ndarray | None, labels: np.ndarray | None,
                 instances: np.ndarray | None = None) -> None:
    """Write one sample into a dataset folder (image as PNG when 8-bit, else TIFF)."""
    root = Path(root)
    if image is not None:
        if image.dtype == np.uint8:
            from PIL import Image

            atomic_write(root / "images" / f"{stem}.png", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
        else:
            import tifffile

            atomic_write(root / "images" / f"{stem}.tif", lambda tmp: tifffile.imwrite(tmp, image, compression="zlib"))
    if labels is not None:
        write_label_map(root / "labels" / f"{stem}.tif", labels)
    if instances is not None:
        write_label_map(root / "instances" / f"{stem}.tif", instances)


__all__ = [
    "DatasetError", "DatasetFolder", "ImageReadError", "Sample", "is_dataset_folder",
    "open_dataset", "read_classes", "write_classes", "write_sample",
]
