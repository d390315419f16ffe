"""What a run builds before its first epoch, in the order it builds it: runtime settings, the
start checkpoint, the data (split, class weights, oversampling) and the loaders.

The order matters: random draws (model initialisation, crops, augmentation) must come in the
same order in every run for a seed to give the same weights, and a resumed run the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from .config import TrainConfig, TrainConfigError
from .data import (LabelledImage, PatchDataset, check_items, item_instances, load_dataset_folders,
                   oversample_indices, pixel_frequencies, rare_classes, split_by_group, to_binary)
from .distributed import DistContext
from .events import TrainingError
from .losses import class_weights_from_frequencies


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_runtime(cfg: TrainConfig) -> None:
    """Thread count, deterministic algorithms and the seed (``train`` restores the first two)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)


@dataclass
class StartCheckpoint:
    weights: dict  # state dict
    classes: list[str]


def load_start_checkpoint(cfg: TrainConfig) -> StartCheckpoint | None:
    """The weights of ``cfg.init_checkpoint``; its model config and normalisation replace ``cfg``'s
    (a distance head may still be added to a model without one)."""
    if not cfg.init_checkpoint:
        return None
    from ..models.checkpoint import load_checkpoint

    start_model, start_meta = load_checkpoint(cfg.init_checkpoint)
    wants_distance = cfg.model.distance_head
    cfg.model = start_meta.model
    cfg.model.distance_head = cfg.model.distance_head or wants_distance
    cfg.normalization = dict(start_meta.normalization)  # the weights were trained with these
    return StartCheckpoint(start_model.state_dict(), start_meta.classes)


@dataclass
class TrainingData:
    classes: list[str]
    train_items: list[LabelledImage]
    val_items: list[LabelledImage]
    split_seed: int
    frequencies: np.ndarray  # pixel share of each class in the training images
    class_weights: np.ndarray | None
    rare: list[int]  # oversampled classes
    index: list[int]  # the training item of each sample of an epoch (repeats = oversampling)


def prepare_data(cfg: TrainConfig, items: tuple[list[LabelledImage], list[str]] | None,
                 start: StartCheckpoint | None) -> TrainingData:
    """Read and check the data, split it by source image, derive class weights and oversampling.

    Sets ``cfg.model.num_classes``: the data decide the class count.
    """
    if items is not None:
        data, classes = list(items[0]), list(items[1])
    else:
        data, classes = load_dataset_folders(cfg.data.dataset, cfg.data.group_pattern, cfg.model.in_channels)
    check_items(data, classes)
    if cfg.data.binary:
        data, classes = to_binary(data, classes)
    if start is not None and start.classes != classes:
        raise TrainConfigError(
            f"init_checkpoint was trained for classes {start.classes}, but the data has {classes}."
        )
    cfg.model.num_classes = len(classes)
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    train_items, val_items = split_by_group(data, cfg.data.val_fraction, split_seed)
    if not train_items:
        raise TrainingError("No training images are left after holding out validation data.")
    freq = pixel_frequencies(train_items, len(classes))
    weights = class_weights_for(cfg, freq, len(classes))
    rare = rare_classes(freq, cfg.oversample) if cfg.oversample.factor > 0 else []
    index = oversample_indices(train_items, rare, cfg.oversample.factor, cfg.oversample.min_share)
    return TrainingData(classes, train_items, val_items, split_seed, freq, weights, rare, index)


def class_weights_for(cfg: TrainConfig, freq: np.ndarray, num_classes: int) -> np.ndarray | None:
    """``cfg.class_weights`` resolved: None, a rule applied to ``freq`` or the list given."""
    spec = cfg.class_weights
    if spec is None and cfg.loss == "weighted_ce":
        spec = "auto"  # weighted CE without weights would be plain CE
    if spec is None:
        return None
    if cfg.loss not in ("weighted_ce", "ce_dice", "bce"):
        raise TrainConfigError(f"class_weights apply to weighted_ce, ce_dice and bce, not to '{cfg.loss}'.")
    if isinstance(spec, str):
        return class_weights_from_frequencies(freq, spec)
    w = np.asarray(spec, float)
    if w.shape != (num_classes,):
        raise TrainConfigError(f"class_weights has {w.size} values for {num_classes} classes.")
    if (w < 0).any() or not np.isfinite(w).all():
        raise TrainConfigError(f"class_weights must be finite and non-negative, got {spec}.")
    return w


def describe_data(cfg: TrainConfig, in_memory: bool, data: TrainingData, crops_per_epoch: int) -> dict:
    """The data record of every checkpoint (and what a resumption must match)."""
    w = data.class_weights
    return {
        "datasets": ["in-memory"] if in_memory else list(cfg.data.dataset),
        "classes": data.classes,
        "binary": bool(cfg.data.binary),
        "train_images": len(data.train_items),
        "val_images": len(data.val_items),
        "val_groups": sorted({it.group for it in data.val_items}),
        "split_seed": data.split_seed,
        "train_pixel_frequencies": [float(f) for f in data.frequencies],
        "class_weights": None if w is None else [float(x) for x in w],
        "oversample": {"rare_classes": data.rare, "samples_per_epoch": len(data.index),
                       "images": len(data.train_items)},
        "crops_per_epoch": crops_per_epoch,
    }


@dataclass
class Loaders:
    train: DataLoader
    sampler: torch.utils.data.Sampler  # a DistributedSampler is told each epoch's number
    generator: torch.Generator  # the training loader's random state (saved for resume)
    val: DataLoader | None  # this rank's share of the validation images; None without any
    val_instances: list[np.ndarray]  # their ground-truth nuclei, for the validation bPQ

    @property
    def crops_per_epoch(self) -> int:
        return len(self.train.dataset)


def build_loaders(cfg: TrainConfig, data: TrainingData, ctx: DistContext, device: torch.device,
                  mean: list[float], std: list[float]) -> Loaders:
    """Random augmented crops for training (sharded over ranks), whole padded images for validation."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = PatchDataset(data.train_items, cfg.data.crop_size, cfg.data.crops_per_image, cfg.augment,
                            index=data.index, mean=mean, std=std, distance_targets=cfg.model.distance_head)
    if ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
        per_rank = math.ceil(len(train_ds) / ctx.world_size)
    else:
        sampler = RandomSampler(train_ds, generator=generator,
                                num_samples=min(cfg.data.samples_per_epoch, len(train_ds)) or None)
        per_rank = len(sampler)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=per_rank > cfg.batch_size,
                              generator=generator, num_workers=cfg.data.num_workers, pin_memory=pin,
                              persistent_workers=cfg.data.num_workers > 0)
    val_shard = data.val_items[ctx.rank::ctx.world_size]
    val_instances = [item_instances(it) for it in val_shard]
    val_loader = None
    if data.val_items:
        val_ds = PatchDataset(val_shard, None, multiple_of=cfg.model.output_stride, mean=mean, std=std,
                              distance_targets=cfg.model.distance_head)
        val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, pin_memory=pin)
    return Loaders(train_loader, sampler, generator, val_loader, val_instances)
