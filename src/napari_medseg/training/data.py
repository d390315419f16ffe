"""Training data: samples from dataset folders or in-memory arrays, split by source image."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.dataset import DatasetError, open_dataset
from ..io.images import to_rgb_float
from .augment import build_augmentation


@dataclass
class LabelledImage:
    name: str
    group: str  # source image: the unit of the train/validation split
    image: np.ndarray  # float32 (H, W, C) in [0, 1]
    labels: np.ndarray  # uint8 (H, W)


def load_dataset_folders(paths: list[str], group_pattern: str, in_channels: int = 3,
                         progress=None) -> tuple[list[LabelledImage], list[str]]:
    """Read every labelled sample of one or more dataset folders that share a class list."""
    if not paths:
        raise DatasetError("No dataset folder given (data.dataset).")
    pattern = re.compile(group_pattern)
    items: list[LabelledImage] = []
    classes: list[str] | None = None
    folders = [open_dataset(p, require_labels=True) for p in paths]
    total = sum(len(f) for f in folders)
    for folder in folders:
        if classes is None:
            classes = folder.classes
        elif folder.classes != classes:
            raise DatasetError(f"{folder.root} has classes {folder.classes}, but the first dataset has {classes}.")
        for stem in folder.stems:
            sample = folder.load(stem)
            match = pattern.match(stem)
            group = f"{folder.root.name}/{match.group(1) if match else stem}"
            items.append(LabelledImage(stem, group, to_rgb_float(sample.image, in_channels), sample.labels.astype(np.uint8)))
            if progress is not None:
                progress(len(items), total)
    return items, classes


def split_by_group(items: list[LabelledImage], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split with every patch of one source image on the same side."""
    groups = sorted({it.group for it in items})
    if val_fraction <= 0:
        return items, []
    if len(groups) < 2:
        raise DatasetError(
            f"Cannot hold out validation data: all {len(items)} images come from one source image. "
            "Add images or set data.val_fraction: 0."
        )
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(groups[:n_val])
    return [it for it in items if it.group not in val_groups], [it for it in items if it.group in val_groups]


def pixel_frequencies(items: list[LabelledImage], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, np.int64)
    for it in items:
        counts += np.bincount(it.labels.ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1)


class PatchDataset(Dataset):
    """Random (augmented) crops for training, or whole images for validation."""

    def __init__(self, items: list[LabelledImage], crop_size: int | None, crops_per_image: int = 1,
                 augment=None, multiple_of: int = 32):
        self.items = items
        self.crop_size = crop_size
        self.crops_per_image = max(1, crops_per_image) if crop_size else 1
        self.transform = build_augmentation(augment, crop_size) if crop_size else None
        self.multiple_of = multiple_of

    def __len__(self) -> int:
        return len(self.items) * self.crops_per_image

    def __getitem__(self, index: int):
        item = self.items[index % len(self.items)]
        image = torch.from_numpy(item.image).permute(2, 0, 1)
        labels = torch.from_numpy(item.labels.astype(np.int64))
        if self.transform is not None:
            image, labels = self.transform(image, labels)
        else:  # validation: pad to a size the network accepts; padded pixels are ignored (-100)
            h, w = labels.shape
            ph, pw = (-h) % self.multiple_of, (-w) % self.multiple_of
            if ph or pw:
                image = torch.nn.functional.pad(image, (0, pw, 0, ph), mode="reflect")
                labels = torch.nn.functional.pad(labels, (0, pw, 0, ph), value=-100)
        return image.contiguous(), labels.contiguous()
