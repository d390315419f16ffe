"""PanNuke folds (Gamper et al. 2019/2020) -> images, class maps, instance maps, tissue types.

A fold holds ``images.npy`` (N, 256, 256, 3), ``masks.npy`` (N, 256, 256, 6) with the
instance ids of each class in channels 0-4 and background in channel 5, and
``types.npy`` (N,) tissue names. The official archive nests them
(``Fold 1/images/fold1/images.npy``, ``Fold 1/masks/fold1/masks.npy``); a flat folder
works too. Files are memory-mapped and never unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import DATASET_FOLDERS, DatasetError, read_classes, write_classes, write_sample
from .outputs import claim_classes, remove_stale_temps

PANNUKE_CLASSES = ["background", "neoplastic", "inflammatory", "connective", "dead", "epithelial"]
# µm/px of PanNuke's patches: cut at 40x (Gamper et al. 2019/2020), as CoNSeP's and MoNuSeg's
PANNUKE_PIXEL_SIZE_UM = 0.25
# a converted fold's classes.json source, "PanNuke fold <name>": its images are each their own
# source image (io.dataset.OWN_SOURCE_PREFIXES)
PANNUKE_SOURCE = "PanNuke fold"


@dataclass
class PanNukeFold:
    root: Path
    images: np.ndarray  # (N, H, W, 3), memory-mapped
    masks: np.ndarray  # (N, H, W, 6), memory-mapped
    tissues: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def stem(self, i: int) -> str:
        """Image ``i``'s name, ``<tissue>_<index>`` (zero-padded): its file stem when converted,
        its name (and, after the fold's, its group) when the fold is read directly.

        Its group: patches of a fold come from many slides, and the fold names none, so each
        patch is its own source image, read directly or converted. Grouping by tissue (what
        the default ``data.group_pattern`` made of a converted fold's stems) held whole tissues
        out of training, a few tissues validating for all nineteen."""
        return f"{self.tissues[i].replace(' ', '_')}_{i:0{len(str(len(self)))}d}"

    def image(self, i: int) -> np.ndarray:
        return np.clip(np.asarray(self.images[i]), 0, 255).astype(np.uint8)

    def check(self, block: int = 16) -> None:
        """Refuses NaN or infinite pixels and negative, fractional or NaN instance ids, naming the
        first image that has them; read in blocks of images, before anything is written."""
        for start in range(0, len(self), block):
            images = np.asarray(self.images[start:start + block])
            images = images.reshape(len(images), -1)
            if images.dtype.kind == "f":
                bad = ~np.isfinite(images).all(1)
                if bad.any():
                    raise DatasetError(f"{self.root}: image {start + int(np.argmax(bad))} of images.npy holds NaN "
                                       "or infinite pixels; fix or drop it before converting.")
            ids = np.asarray(self.masks[start:start + block, ..., :5]).reshape(len(images), -1)
            bad = (ids < 0).any(1)
            if ids.dtype.kind == "f":
                bad |= (~np.isfinite(ids) | (ids % 1 != 0)).any(1)
            if bad.any():
                raise DatasetError(f"{self.root}: mask {start + int(np.argmax(bad))} of masks.npy holds negative, "
                                   "fractional or NaN instance ids; PanNuke ids are whole numbers, 0 for none.")

    def class_and_instance_maps(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(class map uint8, instance map int32) of image ``i``; instance ids made unique per image."""
        mask = np.asarray(self.masks[i])
        classes = np.zeros(mask.shape[:2], np.uint8)
        instances = np.zeros(mask.shape[:2], np.int32)
        next_id = 1
        for c in range(5):
            ids = mask[..., c].astype(np.int64)
            present = np.unique(ids[ids > 0])
            if present.size == 0:
                continue
            classes[ids > 0] = c + 1
            lut = np.zeros(int(present.max()) + 1, np.int32)
            lut[present] = np.arange(next_id, next_id + present.size, dtype=np.int32)
            instances[ids > 0] = lut[ids[ids > 0]]
            next_id += present.size
        return classes, instances


def _find_one(root: Path, name: str) -> Path:
    hits = [root / name] if (root / name).is_file() else sorted(root.rglob(name))
    if not hits:
        raise DatasetError(f"{root} is not a PanNuke fold: no {name} in it.")
    if len(hits) > 1:
        raise DatasetError(f"{root}: {len(hits)} files named {name}; point to a single fold.")
    return hits[0]


def _fold_root(path: Path) -> Path:
    """The fold folder for a path to the fold or to its images.npy."""
    if not path.is_file():
        return path
    # The official archive nests the file as <fold>/images/fold1/images.npy, with masks.npy in a
    # sibling tree, so its parent alone is not a fold; a flat fold holds it directly.
    if path.parent.parent.name == "images" and not (path.parent / "masks.npy").is_file():
        return path.parents[2]
    return path.parent


def is_pannuke_fold(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_file():
        return path.name == "images.npy" and is_pannuke_fold(_fold_root(path))
    if not path.is_dir():
        return False
    try:
        _find_one(path, "images.npy"), _find_one(path, "masks.npy")
    except DatasetError:
        return False
    return True


def read_pannuke_fold(path: str | os.PathLike) -> PanNukeFold:
    root = _fold_root(Path(path))
    images_path, masks_path = _find_one(root, "images.npy"), _find_one(root, "masks.npy")
    try:
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
        masks = np.load(masks_path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DatasetError(f"{root}: images.npy/masks.npy must be plain numeric arrays ({exc}).") from exc
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(f"{images_path}: expected (N, H, W, 3), got {images.shape}.")
    if masks.ndim != 4 or masks.shape[-1] != 6 or masks.shape[:3] != images.shape[:3]:
        raise DatasetError(f"{masks_path}: expected (N, H, W, 6) matching images {images.shape[:3]}, got {masks.shape}.")
    if len(images) == 0 or 0 in images.shape[1:3]:
        raise DatasetError(f"{images_path}: the fold is empty (shape {images.shape}); nothing to convert.")
    for name, array in ((images_path, images), (masks_path, masks)):
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise DatasetError(f"{name}: expected numbers, got {array.dtype}.")
    tissues = ["unknown"] * len(images)
    types_path = next(iter(sorted(root.rglob("types.npy"))), None)
    if types_path is not None:
        try:
            types = np.load(types_path, allow_pickle=False)
        except ValueError as exc:
            raise DatasetError(f"{types_path}: expected an array of strings, refusing a pickled object ({exc}).") from exc
        if len(types) != len(images):
            raise DatasetError(f"{types_path}: {len(types)} tissue types for {len(images)} images.")
        tissues = [str(t) for t in types]
    return PanNukeFold(root, images, masks, tissues)


def convert_pannuke(fold_dir: str | os.PathLike, out_dir: str | os.PathLike, progress=None) -> Path:
    """Write a PanNuke fold as a dataset folder (stems ``<tissue>_<index>``). ``out_dir`` may be
    new, empty, or a PanNuke dataset folder (the same fold again); never another dataset's."""
    fold = read_pannuke_fold(fold_dir)
    out = Path(out_dir)
    _check_apart(fold.root, out)
    fold.check()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"out_dir {out} is a file, not a folder.")
    source = f"{PANNUKE_SOURCE} {fold.root.name}"
    if claim_classes(out, PANNUKE_CLASSES, DATASET_FOLDERS, flag="out_dir"):
        write_classes(out, PANNUKE_CLASSES, source=source)
    elif (held := read_classes(out)[1]) != source:
        # stems are <tissue>_<index within the fold>: another fold's would replace these
        raise DatasetError(f"out_dir {out} holds {held or 'another dataset'}; {source} written there would replace "
                           "its samples of the same names. Convert each fold into a folder of its own.")
    remove_stale_temps(out, *(out / sub for sub in DATASET_FOLDERS))
    for i in range(len(fold)):
        classes, instances = fold.class_and_instance_maps(i)
        write_sample(out, fold.stem(i), fold.image(i), classes, instances)
        if progress is not None:
            progress(i + 1, len(fold))
    return out


def _check_apart(fold: Path, out: Path) -> None:
    """Refuses an ``out`` that is the fold, inside it or around it: the dataset folder would be
    written among the fold's own files (and the fold then read as a dataset folder, or the
    dataset folder as a fold)."""
    fold_real, out_real = Path(os.path.realpath(fold)), Path(os.path.realpath(out))
    if out_real == fold_real or fold_real in out_real.parents or out_real in fold_real.parents:
        where = "is" if out_real == fold_real else "is inside" if fold_real in out_real.parents else "holds"
        raise DatasetError(f"out_dir {out} {where} the PanNuke fold {fold}: convert into a folder of its own, "
                           "outside the fold.")
