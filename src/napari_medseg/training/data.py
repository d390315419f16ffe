"""Training data: dataset folders, PanNuke folds or in-memory arrays, split by source image.

Large images are sampled as random crops (``crops_per_image``; 0 = as many as the image
holds crops); validation runs on whole images, padded to a size the network accepts with
padded pixels ignored. Minority-class oversampling repeats training images rich in rare
classes; every copy gets its own random crop and augmentation.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.dataset import DatasetError, open_dataset
from ..io.images import to_rgb_float
from .augment import build_augmentation
from .items import LabelledImage


DISTANCE_IGNORE = -1.0  # distance-target pixels that never count in the loss


def _load_pannuke(path: str, in_channels: int) -> tuple[list[LabelledImage], list[str]]:
    from ..io.pannuke import PANNUKE_CLASSES, read_pannuke_fold

    fold = read_pannuke_fold(path)
    items = []
    for i in range(len(fold)):
        labels, instances = fold.class_and_instance_maps(i)
        # PanNuke patches are independent 256x256 fields of view: each is its own group, named
        # as its converted dataset folder names it (PanNukeFold.stem), so both split alike
        stem = fold.stem(i)
        items.append(LabelledImage(stem, f"{fold.root.name}/{stem}",
                                   to_rgb_float(fold.image(i), in_channels), labels, instances))
    return items, list(PANNUKE_CLASSES)


def check_dataset_exists(path: str | Path, setting: str) -> None:
    """Refuses a dataset path that names nothing, saying the absolute path looked at: a relative
    path is read from the current folder, not the config's (a config run from elsewhere misses it)."""
    if Path(path).exists():
        return
    where = Path(path).absolute()
    relative = "" if Path(path).is_absolute() else f" (relative paths are read from the current folder {Path.cwd()})"
    raise DatasetError(f"Dataset '{path}' ({setting}) does not exist: no folder {where}{relative}.")


def load_dataset_folders(paths: list[str], group_pattern: str, in_channels: int = 3,
                         progress=None) -> tuple[list[LabelledImage], list[str]]:
    """Read every labelled sample of one or more dataset folders (or PanNuke folds) that share a class list."""
    from ..io.pannuke import is_pannuke_fold

    if not paths:
        raise DatasetError("No dataset folder given (data.dataset).")
    items: list[LabelledImage] = []
    classes: list[str] | None = None
    folders = []
    for p in paths:
        check_dataset_exists(p, "data.dataset")
        if is_pannuke_fold(p) and not _holds_samples(Path(p)):
            fold_items, fold_classes = _load_pannuke(p, in_channels)
            if classes is not None and fold_classes != classes:
                raise DatasetError(f"{p} has classes {fold_classes}, but the first dataset has {classes}.")
            classes = fold_classes
            items += fold_items
        else:
            folders.append(open_dataset(p, require_labels=True))
    total = len(items) + sum(len(f) for f in folders)
    for folder in folders:
        if classes is None:
            classes = folder.classes
        elif folder.classes != classes:
            raise DatasetError(f"{folder.root} has classes {folder.classes}, but the first dataset has {classes}.")
        for stem in folder.stems:
            sample = folder.load(stem)
            group = folder.group(stem, group_pattern)
            items.append(LabelledImage(stem, group, to_rgb_float(sample.image, in_channels), sample.labels.astype(np.uint8),
                                       sample.instances, pixel_size_um=sample.pixel_size_um))
            if progress is not None:
                progress(len(items), total)
    if not items:
        raise DatasetError(f"No labelled images in {', '.join(map(str, paths))}.")
    return items, classes


def _holds_samples(path: Path) -> bool:
    """A dataset folder's marks: its classes.json, or image files directly in images/ (the
    official PanNuke archive has an images/ folder too, holding only fold1/images.npy's folder)."""
    if (path / "classes.json").is_file():
        return True
    images = path / "images"
    return images.is_dir() and any(f.is_file() and not f.name.startswith(".") for f in images.iterdir())


def check_items(items: list[LabelledImage], classes: list[str]) -> None:
    """Refuse in-memory data that cannot train (what the viewer hands over is not pre-checked)."""
    if len(classes) < 2:
        raise DatasetError(f"Training needs at least two classes (background and one more), got {classes}.")
    if not items:
        raise DatasetError("The training data is empty: no labelled images.")
    for it in items:
        if it.image.ndim != 3 or it.labels.shape != it.image.shape[:2]:
            raise DatasetError(
                f"'{it.name}': labels of shape {it.labels.shape} do not match its image {it.image.shape[:2]}."
            )
        if not np.issubdtype(it.labels.dtype, np.integer):
            raise DatasetError(f"'{it.name}': labels must be integer class ids, not {it.labels.dtype}.")
        if it.binary:
            continue  # nucleus / background codes, made by training.mixed
        if it.labels.size and (int(it.labels.max()) >= len(classes) or int(it.labels.min()) < 0):
            raise DatasetError(
                f"'{it.name}' holds class id {int(it.labels.max())}, but there are only {len(classes)} classes "
                f"(ids 0..{len(classes) - 1}: {', '.join(classes)})."
            )
        if not np.isfinite(it.image).all():
            raise DatasetError(f"'{it.name}': the image contains NaN or infinite values.")
        if it.instances is not None and it.instances.shape != it.labels.shape:
            raise DatasetError(f"'{it.name}': instances of shape {it.instances.shape} do not match its labels {it.labels.shape}.")


def to_binary(items: list[LabelledImage], classes: list[str]) -> tuple[list[LabelledImage], list[str]]:
    """Nucleus (any class > 0) vs background; binary sets' codes become the same two classes."""
    from .mixed import nucleus_mask

    if len(classes) == 2 and not any(it.binary for it in items):
        return items, list(classes)
    return ([replace(it, labels=nucleus_mask(it).astype(np.uint8), binary=False) for it in items],
            ["background", "nucleus"])


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


def rare_classes(freq: np.ndarray, cfg) -> list[int]:
    """The oversampling's rare classes: given, or foreground classes rarer than ``cfg.below``."""
    if cfg.classes is not None:
        bad = [c for c in cfg.classes if not 0 < int(c) < len(freq)]
        if bad:
            raise DatasetError(f"oversample.classes {bad} are not foreground class ids (1..{len(freq) - 1}).")
        return sorted(int(c) for c in cfg.classes)
    return [c for c in range(1, len(freq)) if 0 < freq[c] < cfg.below]


def oversample_indices(items: list[LabelledImage], rare: list[int], factor: int, min_share: float) -> list[int]:
    """Item indices for one epoch: every item once, plus ``factor`` more copies of each item whose
    rare-class pixels are at least ``min_share`` of it."""
    index = list(range(len(items)))
    if factor <= 0 or not rare:
        return index
    for i, it in enumerate(items):
        share = np.isin(it.labels, rare).mean() if it.labels.size else 0.0
        if share >= min_share and share > 0:
            index += [i] * factor
    return index


def crops_for(item: LabelledImage, crop_size: int, crops_per_image: int) -> int:
    if crops_per_image > 0:
        return crops_per_image
    h, w = item.labels.shape
    return max(1, round(h * w / crop_size**2))  # auto: about as many crops as the image holds


def normalization_stats(normalization) -> tuple[list[float], list[float]]:
    from ..models.checkpoint import IMAGENET_NORMALIZATION

    if normalization == "imagenet":
        return list(IMAGENET_NORMALIZATION["mean"]), list(IMAGENET_NORMALIZATION["std"])
    if normalization in ("none", None):
        return [0.0], [1.0]
    return [float(v) for v in normalization["mean"]], [float(v) for v in normalization["std"]]


class PatchDataset(Dataset):
    """Random (augmented) crops for training, or whole images for validation.

    ``index`` lists the item of every sample (repeats = oversampling); images are
    normalised with ``mean``/``std`` after augmentation, exactly as inference does.
    ``distance_targets``: samples are ``(image, labels, distance)``, the distance being the
    nucleus distance map of the item's instances (derived from its labels by the watershed
    where it has none, e.g. classes painted in the viewer), made once here. ``touch_weight``
    other than 1 (with ``distance_targets``): a fourth, ``(image, labels, distance, weight)``,
    the weight of each pixel in the distance loss: ``touch_weight`` where two nuclei meet
    (``touch_weights``), 1 elsewhere.
    """

    def __init__(self, items: list[LabelledImage], crop_size: int | None, crops_per_image: int = 1,
                 augment=None, multiple_of: int = 32, index: list[int] | None = None,
                 mean=(0.0,), std=(1.0,), distance_targets: bool = False, touch_weight: float = 1.0):
        self.items = items
        self.distances = [distance_target(it) for it in items] if distance_targets else None
        self.distance_weights = [touch_weights(it, touch_weight) for it in items] \
            if distance_targets and touch_weight != 1 else None
        self.crop_size = crop_size
        base = index if index is not None else list(range(len(items)))
        if crop_size:
            self.index = [i for i in base for _ in range(crops_for(items[i], crop_size, crops_per_image))]
        else:
            self.index = base
        self.transform = build_augmentation(augment, crop_size) if crop_size else None
        self.multiple_of = multiple_of
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int | tuple[int, int]):
        """Sample ``index``; ``(index, seed)``: its augmentation drawn from ``seed`` alone (the
        training sampler's ``AugmentationSeeds``), else from torch's global random state."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        item_index = self.index[index]
        item = self.items[item_index]
        image = torch.from_numpy(item.image).permute(2, 0, 1)
        labels = torch.from_numpy(item.labels.astype(np.int64))
        targets = [labels] if self.distances is None else [labels, torch.from_numpy(self.distances[item_index])]
        if self.distance_weights is not None:
            targets.append(torch.from_numpy(self.distance_weights[item_index]))
        if self.transform is not None:
            # Small tensors: one thread is several times faster than a thread pool (and does not
            # fight the training step for cores); restored at once.
            threads = torch.get_num_threads()
            if threads > 1:
                torch.set_num_threads(1)
            random_state = None if seed is None else torch.random.default_generator.get_state()
            try:
                if seed is not None:
                    torch.random.default_generator.manual_seed(seed)
                image, *targets = self.transform(image, *targets)
            finally:
                if random_state is not None:  # the process's own random state, as it was
                    torch.random.default_generator.set_state(random_state)
                if threads > 1:
                    torch.set_num_threads(threads)
            image = (image - self.mean) / self.std
        else:
            image = (image - self.mean) / self.std  # validation: pad to a size the network accepts; padded pixels are ignored (-100)
            h, w = labels.shape
            ph, pw = (-h) % self.multiple_of, (-w) % self.multiple_of
            if ph or pw:
                image = image[:, mirror_index(h, h + ph)][:, :, mirror_index(w, w + pw)]
                targets = [torch.nn.functional.pad(t, (0, pw, 0, ph), value=-100) for t in targets]
        return (image.contiguous(), *(t.contiguous() for t in targets))


def mirror_index(n: int, size: int) -> torch.Tensor:
    """``size`` indices into an axis of length ``n``: the axis, then its mirror image without the
    edge pixel (torch's ``reflect`` padding), repeated as often as ``size`` needs: an image
    smaller than the network's stride (e.g. 16 px for 32) is padded too, which ``reflect``
    refuses. A 1-pixel axis repeats its pixel."""
    if n == 1:
        return torch.zeros(size, dtype=torch.long)
    period = 2 * (n - 1)
    j = torch.arange(size) % period
    return torch.where(j < n, j, period - j)


# px: where an annotation has no instance map, its blobs under this size are stray brush strokes.
# Not the prediction's floor (InstanceSettings.min_size, measured on model output): an
# annotated nucleus is meant, however small.
ANNOTATION_MIN_SIZE = 10


def item_instances(item: LabelledImage) -> np.ndarray:
    """An item's nuclei: its instance map, or the watershed of its labels where it has none."""
    from ..nuclei.watershed import InstanceSettings, semantic_to_instances

    if item.instances is not None:
        return item.instances
    labels = item.labels
    if item.binary:
        from .mixed import BINARY_NUCLEUS  # here: mixed imports this module

        # a binary set's background is coded 254: it had been cut as one nucleus (the whole image),
        # the distance head trained towards one blob and the set's validation bPQ read 0
        labels = (labels == BINARY_NUCLEUS).astype(np.uint8)
    return semantic_to_instances(labels, InstanceSettings(min_size=ANNOTATION_MIN_SIZE))


def distance_target(item: LabelledImage) -> np.ndarray:
    """The distance head's target for one item: float32 ``(H, W)`` in [0, 1], and
    ``DISTANCE_IGNORE`` on the nuclei its set does not trust (``item.distance_trust``)."""
    from ..nuclei.distance import nucleus_distance_map
    from .mixed import untrusted_nuclei

    instances = item_instances(item)
    target = nucleus_distance_map(instances)
    target[untrusted_nuclei(instances, item.distance_trust)] = DISTANCE_IGNORE
    return target


def touch_weights(item: LabelledImage, weight: float) -> np.ndarray:
    """float32 ``(H, W)``: ``weight`` on the pixels where the item's nuclei touch one another
    (``nuclei.distance.touching_pixels``), 1 elsewhere: the distance loss's per-pixel weight."""
    from ..nuclei.distance import touching_pixels

    out = np.ones(item.labels.shape, np.float32)
    out[touching_pixels(item_instances(item))] = weight
    return out
