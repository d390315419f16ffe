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
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..io.dataset import GROUP_PATTERN, tile_row_step
from ..models.config import ModelConfig
from .config import TrainConfig, TrainConfigError
from .data import (LabelledImage, PatchDataset, check_items, item_instances, load_dataset_folders,
                   oversample_indices, pixel_frequencies, rare_classes, split_by_group, to_binary)
from .distributed import DistContext
from .events import DataSplit, TrainingError
from .losses import class_weights_from_frequencies
from .mixed import load_mixed_sets, sampling_weights, split_each_set
from .pixel_scale import at_pixel_size
from .validation import ValidationSet


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
    foreground_threshold: float | None  # its tuned threshold, kept until the run tunes its own
    instance_settings: dict = field(default_factory=dict)  # its nucleus settings, kept (medseg tune-nuclei)
    class_choice_weights: list[float] = field(default_factory=list)  # its class weights, kept (medseg tune-classes)
    notes: list[str] = field(default_factory=list)  # what of the config the start checkpoint overrode, said
    held_out: list[str] = field(default_factory=list)  # the source images its run validated on (data.val_groups)
    split_seed: int | None = None  # the seed of that split


# the network's shape: a config that sets one of these otherwise than its start checkpoint gets
# the checkpoint's (its weights fit no other), and is told so
NETWORK_SHAPE_FIELDS = ("architecture", "encoder", "encoder_depth", "decoder_channels", "base_channels", "depth")


def load_start_checkpoint(cfg: TrainConfig) -> StartCheckpoint | None:
    """The weights of ``cfg.init_checkpoint``; its model config and normalisation replace ``cfg``'s
    (a distance head may still be added to a model without one)."""
    if not cfg.init_checkpoint:
        return None
    from ..models.checkpoint import load_checkpoint

    start_model, start_meta = load_checkpoint(cfg.init_checkpoint)
    wants_distance = cfg.model.distance_head
    notes = _overridden_network(cfg.model, start_meta.model)
    # its weights replace the whole network, so the ImageNet file its own run started from (recorded
    # in its config, e.g. the shipped default's) is neither read nor needed here
    cfg.model = replace(start_meta.model, encoder_weights=None)
    cfg.model.distance_head = cfg.model.distance_head or wants_distance
    cfg.normalization = dict(start_meta.normalization)  # the weights were trained with these
    if cfg.pixel_size_um is None:
        # fine-tuned on images at the start's scale unless the config says otherwise: a model that
        # lost it was run on 20x slides unscaled (304 nuclei where the default found 496)
        cfg.pixel_size_um = start_meta.pixel_size_um
    elif start_meta.pixel_size_um and abs(cfg.pixel_size_um / start_meta.pixel_size_um - 1) > 0.01:
        notes.append(f"pixel size {cfg.pixel_size_um:g} µm/px (the config's) recorded, where the start checkpoint "
                     f"was trained at {start_meta.pixel_size_um:g}")
    recorded = start_meta.data if isinstance(start_meta.data, dict) else {}
    held_out = recorded.get("val_groups")
    split_seed = recorded.get("split_seed")
    return StartCheckpoint(start_model.state_dict(), start_meta.classes, start_meta.foreground_threshold,
                           dict(start_meta.instance_settings), list(start_meta.class_choice_weights), notes,
                           [g for g in held_out if isinstance(g, str)] if isinstance(held_out, list) else [],
                           split_seed if isinstance(split_seed, int) else None)


def _overridden_network(asked: ModelConfig, start: ModelConfig) -> list[str]:
    """A note where the config sets the network's shape otherwise than the start checkpoint."""
    default = ModelConfig()
    if all(getattr(asked, name) == getattr(default, name) for name in NETWORK_SHAPE_FIELDS):
        return []  # the config sets no network of its own
    differ = [name for name in NETWORK_SHAPE_FIELDS if getattr(asked, name) != getattr(start, name)]
    if not differ:
        return []
    said = ", ".join(f"{name} {getattr(asked, name)} -> {getattr(start, name)}" for name in differ)
    return [f"the network is init_checkpoint's, whose weights fit no other: the config's model settings are not used "
            f"({said})"]


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
    mixed: bool = False  # read from data.datasets: sampled by set weight, validated per set
    resampled: str = ""  # which images were resampled to the run's pixel size (said before the first epoch)
    # source images the start checkpoint held out that this run trains on: figures measured on them
    # afterwards are no longer held out (said before the first epoch, recorded in the checkpoint)
    start_held_out_trained: list[str] = field(default_factory=list)

    @property
    def has_binary_sets(self) -> bool:
        return any(it.binary for it in self.train_items + self.val_items)


def prepare_data(cfg: TrainConfig, items: tuple[list[LabelledImage], list[str]] | None,
                 start: StartCheckpoint | None) -> TrainingData:
    """Read and check the data, split it by source image, derive class weights and oversampling.

    Sets ``cfg.model.num_classes``: the data decide the class count.
    """
    mixed = items is None and bool(cfg.data.datasets)
    if items is not None:
        data, classes = list(items[0]), list(items[1])
    elif mixed:
        data, classes = load_mixed_sets(cfg.data.datasets, cfg.data.group_pattern, cfg.model.in_channels)
    else:
        data, classes = load_dataset_folders(cfg.data.dataset, cfg.data.group_pattern, cfg.model.in_channels)
    check_items(data, classes)
    data, resampled = at_pixel_size(data, cfg.pixel_size_um)
    if cfg.data.binary:
        data, classes = to_binary(data, classes)
    if start is not None and mixed and all(it.binary for it in data):
        # nucleus / background sets train the summed nucleus probability of any class list: the
        # start's classes stay (they were refused: 'the data has [background, nucleus]')
        classes = list(start.classes)
    if start is not None and start.classes != classes:
        raise TrainConfigError(
            f"init_checkpoint was trained for classes {start.classes}, but the data has {classes}. Fine-tune it on "
            "data of its classes; or, to train its nuclei (not its classes) on nucleus / background masks, list the "
            "folder under data.datasets with 'labels: binary' (e.g. data.datasets: [{path: FOLDER, labels: binary}], "
            "no data.dataset); or train a new model without init_checkpoint."
        )
    cfg.model.num_classes = len(classes)
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    split = split_each_set if mixed else split_by_group
    train_items, val_items = split(data, cfg.data.val_fraction, split_seed)
    if not train_items:
        raise TrainingError("No training images are left after holding out validation data.")
    freq = pixel_frequencies(train_items, len(classes))
    weights = class_weights_for(cfg, freq, len(classes))
    rare = rare_classes(freq, cfg.oversample) if cfg.oversample.factor > 0 else []
    index = oversample_indices(train_items, rare, cfg.oversample.factor, cfg.oversample.min_share)
    trained = sorted(set(start.held_out) & {it.group for it in train_items}) if start is not None else []
    return TrainingData(classes, train_items, val_items, split_seed, freq, weights, rare, index, mixed, resampled,
                        trained)


def start_held_out_note(data: TrainingData, start: StartCheckpoint | None) -> str:
    """A warning where the run trains on source images its start checkpoint held out: a fine-tune
    with another seed splits otherwise, and the start's held-out figures then flatter the result."""
    trained = data.start_held_out_trained
    if not trained:
        return ""
    shown = ", ".join(trained[:4]) + (f", ... ({len(trained)} in all)" if len(trained) > 4 else "")
    keep = (f"set data.split_seed: {start.split_seed} to validate on the start's held-out images"
            if start is not None and start.split_seed is not None else "split as the start's run did")
    return (f"This run trains on {len(trained)} source image{'s' if len(trained) != 1 else ''} the start "
            f"checkpoint held out for validation ({shown}); figures measured on them afterwards are not held out. "
            f"To compare with the start, {keep}.")


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
        "datasets": ["in-memory"] if in_memory else ([asdict(spec) for spec in cfg.data.datasets]
                                                      or list(cfg.data.dataset)),
        "classes": data.classes,
        "binary": bool(cfg.data.binary),
        "train_images": len(data.train_items),
        "val_images": len(data.val_items),
        "val_groups": sorted({it.group for it in data.val_items}),
        **({"val_images_per_set": _count_by_set(data.val_items)} if data.mixed else {}),
        "split_seed": data.split_seed,
        "train_pixel_frequencies": [float(f) for f in data.frequencies],
        "class_weights": None if w is None else [float(x) for x in w],
        "oversample": {"rare_classes": data.rare, "samples_per_epoch": len(data.index),
                       "images": len(data.train_items)},
        "crops_per_epoch": crops_per_epoch,
        **({"trains_on_start_held_out": list(data.start_held_out_trained)} if data.start_held_out_trained else {}),
    }


def oversized_crop_note(crop_size: int | None, items: list[LabelledImage]) -> str:
    """A note where every training image is smaller than a crop on some side: each crop is
    mostly padding (ignored by the loss), and a step costs (crop / image)² the work (crop_size 512 on
    256² patches: 38 s an epoch for 1 s)."""
    if not crop_size or not items:
        return ""
    height = max(it.image.shape[0] for it in items)
    width = max(it.image.shape[1] for it in items)
    if crop_size <= min(height, width):
        return ""
    return (f"data.crop_size {crop_size} is larger than the training images (at most {width} x {height} px): crops "
            f"are padded with pixels the loss ignores, at several times the work a step; set data.crop_size "
            f"to {min(height, width)} or less.")


def processes_note(world_size: int, batch_size: int) -> str:
    """Under torchrun ``batch_size`` is each process's: said before the first epoch (2 processes
    had trained batch 16 with half the steps of a run whose config says 8, at the same lr)."""
    if world_size <= 1:
        return ""
    return (f"{world_size} processes: batch_size {batch_size} each, so {world_size * batch_size} crops a step and "
            f"1/{world_size} of the steps an epoch at the same lr; for one process's optimisation give "
            f"batch_size {max(1, batch_size // world_size)} (and the lr to match).")


def describe_split(data: TrainingData, group_pattern: str) -> DataSplit:
    """The ``DataSplit`` of ``data``, with a note where the source images look like columns of
    tiles named by their coordinates (``io.dataset.tile_row_step``) under the default pattern."""
    names = list(dict.fromkeys(it.dataset for it in data.train_items + data.val_items)) if data.mixed else [""]
    rows, notes = [], []
    for name in names:
        train = [it for it in data.train_items if it.dataset == name or not name]
        val = [it for it in data.val_items if it.dataset == name or not name]
        groups = sorted({it.group for it in train + val})
        rows.append({"name": name, "train_images": len(train), "train_sources": len({it.group for it in train}),
                     "val_images": len(val), "val_sources": sorted({it.group for it in val})})
        step = tile_row_step(groups) if group_pattern == GROUP_PATTERN else 0
        if step:
            shown = ", ".join(g.rsplit("/", 1)[-1] for g in groups[:3])
            notes.append(f"{name + ': ' if name else ''}the source images found ({shown}, ...) end in multiples of "
                         f"{step}: if the images are tiles named <slide>_<x>_<y>, each column of a slide is taken "
                         "as a source image and one slide's tiles fall on both sides of the split (validation "
                         r"looks better than it is); set data.group_pattern: '^(.*)_\d+_\d+$' to keep each slide whole")
    return DataSplit(rows, " ".join(notes))


def _count_by_set(items: list[LabelledImage]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for it in items:
        counts[it.dataset] = counts.get(it.dataset, 0) + 1
    return counts


@dataclass
class Loaders:
    train: DataLoader
    sampler: torch.utils.data.Sampler  # a DistributedSampler is told each epoch's number
    generator: torch.Generator  # the training loader's random state (saved for resume)
    val_sets: list[ValidationSet]  # this rank's share of the validation images, per set; [] without any
    crops_per_epoch: int  # what the sampler draws an epoch, over all ranks (not the crops there are)


def build_loaders(cfg: TrainConfig, data: TrainingData, ctx: DistContext, device: torch.device,
                  mean: list[float], std: list[float]) -> Loaders:
    """Random augmented crops for training (sharded over ranks), whole padded images for validation."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = PatchDataset(data.train_items, cfg.data.crop_size, cfg.data.crops_per_image, cfg.augment,
                            index=data.index, mean=mean, std=std, distance_targets=cfg.model.distance_head,
                            touch_weight=cfg.distance_touch_weight)
    sampler = AugmentationSeeds(_train_sampler(cfg, data, train_ds, ctx), cfg.seed, ctx.rank)
    per_rank = len(sampler)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=per_rank > cfg.batch_size,
                              generator=generator, num_workers=cfg.data.num_workers, pin_memory=pin,
                              persistent_workers=cfg.data.num_workers > 0)
    return Loaders(train_loader, sampler, generator, _validation_sets(cfg, data, ctx, mean, std, pin),
                   per_rank * ctx.world_size)


def _train_sampler(cfg: TrainConfig, data: TrainingData, train_ds: PatchDataset,
                   ctx: DistContext) -> torch.utils.data.Sampler:
    """Mixed sets: crops drawn per set weight; otherwise every crop once per epoch (or a random
    ``samples_per_epoch`` of them); under DDP the ranks share them out, so an epoch has the
    crops of a single-process run."""
    wanted = cfg.data.samples_per_epoch or len(train_ds)
    if data.mixed:
        weights = sampling_weights(data.train_items, train_ds.index, cfg.data.datasets)
        return WeightedEpochSampler(weights, wanted, cfg.seed, ctx.rank, ctx.world_size)
    return EpochSampler(len(train_ds), wanted, cfg.seed, ctx.rank, ctx.world_size)


def _validation_sets(cfg: TrainConfig, data: TrainingData, ctx: DistContext, mean, std, pin: bool
                     ) -> list[ValidationSet]:
    """Whole padded validation images, one set per dataset of a mixed run or one unnamed set.

    Images of any size: a batch holds images of one padded size only (the shard is ordered by
    it, stably, so data of one size batch as they always did). A mixed run's batches hold about
    ``batch_size`` 256² images' worth of pixels; the unnamed set's ``batch_size`` images."""
    if not data.val_items:
        return []
    names = list(dict.fromkeys(it.dataset for it in data.val_items)) if data.mixed else [""]
    stride = cfg.model.output_stride
    sets = []
    for name in names:
        members = [it for it in data.val_items if it.dataset == name] if name else data.val_items
        shard = sorted(members[ctx.rank::ctx.world_size], key=lambda it: padded_shape(it.labels.shape, stride))
        loader = None
        if shard:
            largest = max(it.labels.size for it in members)
            cap = max(1, min(cfg.batch_size, cfg.batch_size * 256 * 256 // largest)) if name else cfg.batch_size
            ds = PatchDataset(shard, None, multiple_of=stride, mean=mean, std=std,
                              distance_targets=cfg.model.distance_head, touch_weight=cfg.distance_touch_weight)
            loader = DataLoader(ds, batch_sampler=same_size_batches(shard, stride, cap),
                                num_workers=cfg.data.num_workers, pin_memory=pin)
        sets.append(ValidationSet(name, members[0].binary, loader, [item_instances(it) for it in shard]))
    return sets


def padded_shape(shape: tuple[int, ...], multiple: int) -> tuple[int, int]:
    """(height, width) of an image padded up to a multiple of the network's stride."""
    h, w = shape[:2]
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def same_size_batches(items: list[LabelledImage], multiple: int, batch_size: int) -> list[list[int]]:
    """Batches of consecutive item indices, each of one padded size and at most ``batch_size``
    long (a validation batch is one tensor: images of other sizes cannot share it)."""
    batches: list[list[int]] = []
    last = None
    for i, it in enumerate(items):
        size = padded_shape(it.labels.shape, multiple)
        if size != last or len(batches[-1]) >= batch_size:
            batches.append([])
        batches[-1].append(i)
        last = size
    return batches


def stream_seed(*numbers: int) -> int:
    """A 63-bit seed that is a function of ``numbers`` (e.g. seed, epoch, rank) alone."""
    entropy = [int(n) % 2**64 for n in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


AUGMENTATION_STREAM = 0xA06  # keeps the augmentation seeds apart from other streams of one seed
EPOCH_STREAM = 0xE90


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the process's random generators (torch's, CUDA's, NumPy's, Python's) for an epoch
    from (seed, epoch, rank) alone: what draws from them while training (dropout) draws on every
    rank what an uninterrupted run drew, however the run was resumed; the resume file holds
    only rank 0's states."""
    s = stream_seed(seed, epoch, rank, EPOCH_STREAM)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class AugmentationSeeds(torch.utils.data.Sampler):
    """``sampler``'s crops, each as ``(crop, seed of its augmentation)`` (``PatchDataset`` draws
    the crop's random augmentation from that seed alone).

    The seeds are a function of (seed, epoch, rank, place in the epoch): not of the random state
    of the process that augments. So DataLoader workers, persistent from epoch to epoch, draw
    what the training process would, and a resumed run (fresh workers) what an uninterrupted
    one drew. ``set_epoch`` is called each epoch (and passed on to ``sampler``)."""

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        crops = list(self.sampler)
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, self.rank, AUGMENTATION_STREAM))
        seeds = torch.randint(0, 2**62, (len(crops),), generator=generator).tolist()
        return iter(list(zip(crops, seeds)))


class EpochSampler(torch.utils.data.Sampler):
    """``num_samples`` crops of the ``size`` there are, each epoch a random choice in random
    order drawn from (seed, epoch) alone, not from a random state carried from epoch to epoch: a
    resumed run draws what an uninterrupted one did, whatever DataLoader workers drew before
    (``set_epoch`` is called each epoch). Up to ``size`` they all differ; more go on with further
    random orders of them all (each draw of an image is a crop and augmentation of its own).
    It took at most ``size`` before: ``data.samples_per_epoch`` above the crops there are was
    cut to their number without a word.

    Under DDP every rank draws the same list and takes every ``world_size``-th crop from its
    ``rank``-th on: the epoch's crops are shared out, not multiplied. Ranks must take equal
    shares (as many steps each), so a list that does not divide evenly is completed with its
    first crops (as torch's ``DistributedSampler`` does)."""

    def __init__(self, size: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.num_samples, self.seed, self.epoch = size, num_samples if size else 0, seed, 0
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(self.num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, CROPS_STREAM))
        drawn: list[int] = []
        while len(drawn) < self.num_samples:  # one order of them all, and more where more are asked for
            drawn += torch.randperm(self.size, generator=generator)[:self.num_samples - len(drawn)].tolist()
        total = self.per_rank * self.world_size
        drawn = (drawn * math.ceil(total / len(drawn)))[:total] if drawn else []
        return iter(drawn[self.rank::self.world_size])


CROPS_STREAM = 0xC40


class WeightedEpochSampler(torch.utils.data.Sampler):
    """``num_samples`` crops per epoch drawn with replacement in proportion to ``weights``, from
    a generator seeded by (seed, epoch): every rank draws the same list and takes its share, and a
    resumed run the same draws as an uninterrupted one (``set_epoch`` is called each epoch)."""

    def __init__(self, weights: list[float], num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.per_rank = math.ceil(num_samples / world_size)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=generator)
        return iter(drawn[self.rank::self.world_size].tolist())
