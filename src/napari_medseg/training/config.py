"""Training configuration: one dataclass, loaded from YAML, saved inside every checkpoint."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import MedsegError
from ..io.dataset import GROUP_PATTERN
from ..models.config import ModelConfig, encoder_depth_error, ignored_settings_errors
from ..models.fields import type_errors


class TrainConfigError(MedsegError, ValueError):
    """A training configuration is incomplete or contradicts itself."""


# fine-tuning: the smallest gain over the start model of any set's nucleus Dice or bPQ, so the
# epoch kept is the one that gives up least anywhere (training.progress)
LEAST_GAIN_MONITOR = "val_least_gain_over_start"
# what ``monitor`` may name: the validation loss or a number validation reports (training.validation)
MONITORS = ("val_loss", "val_miou", "val_mean_dice", "val_nucleus_dice", "val_pixel_accuracy", "val_bpq",
            # mixed label sets: the weakest set's figure, so a gain on one set cannot hide a loss on another
            "val_worst_set_nucleus_dice", "val_worst_set_bpq", LEAST_GAIN_MONITOR)


# ``medseg average`` (``average``), here so the CLI lists them without importing torch
BN_CROPS = 1024  # training crops whose activations give the averaged model's batch-norm statistics
BATCHNORM = ("average", "measure")  # batch-norm statistics: mixed like the weights, or measured again
# the losses build_loss (training.losses) makes, by the name a config gives
LOSSES = ("ce", "weighted_ce", "bce", "dice", "log_cosh_dice", "focal", "ce_dice")
LABEL_KINDS = ("classes", "binary")
DISTANCE_TRUST = ("all", "convex", "none")


@dataclass
class DatasetSpec:
    """One dataset folder of a mixed training set (``data.datasets``)."""

    path: str = ""
    # classes: its class ids train every class; binary: only nucleus vs background, through the
    # summed nucleus class probabilities (its class names are ignored; see training/mixed.py)
    labels: str = "classes"
    weight: float = 1.0  # share of each epoch's crops drawn from this set, relative to the others
    # how far its instance maps are trusted for the distance head: all | convex (nuclei of
    # solidity >= 0.85 only; for connected components that may merge touching nuclei) | none
    distance: str = "all"


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=list)  # dataset folders, merged (same classes)
    # or: dataset folders each with its label kind and sampling weight (mixed label sets)
    datasets: list[DatasetSpec] = field(default_factory=list)
    val_fraction: float = 0.15  # of source images (split by image, never by patch)
    crop_size: int = 256
    crops_per_image: int = 1  # random crops drawn from each training image per epoch; 0 = image area / crop area
    # train on this many crops per epoch, a seeded random choice (more than the training images' crops:
    # they are drawn again, each a random crop of its own); 0 = each crop once
    samples_per_epoch: int = 0
    group_pattern: str = GROUP_PATTERN  # stem -> source image; patches of one image stay on one side
    split_seed: int | None = None  # seed of the train/validation split; None = the run's seed
    binary: bool = False  # nucleus (any class > 0) vs background: classes become [background, nucleus]
    num_workers: int = 0  # DataLoader worker processes (0 = in the training process)


@dataclass
class OversampleConfig:
    """Minority-class oversampling: training images rich in rare classes are repeated (each copy
    gets its own random crop and augmentation)."""

    factor: int = 0  # extra copies of every rich image per epoch; 0 = off
    classes: list[int] | None = None  # rare class ids; None = foreground classes rarer than ``below``
    below: float = 0.02  # auto: a foreground class is rare when its training pixel share is below this
    min_share: float = 0.005  # an image is rich when rare-class pixels are at least this share of it


@dataclass
class QuadraticStopConfig:
    """EBHI early stop: fit a quadratic through the last ``window`` monitored losses with the
    first and last fixed; stop when the fitted decrease per epoch at the current epoch is below
    ``threshold`` for more than ``patience`` consecutive epochs, counting from epoch ``start``."""

    enabled: bool = False
    window: int = 10
    threshold: float = 1e-3
    patience: int = 5
    start: int = 10


@dataclass
class AugmentConfig:
    flip: bool = True
    rotate90: bool = True
    scale: tuple[float, float] | None = (0.8, 1.25)
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.04
    # H&E stain jitter (RGB only): each stain's concentration scaled by 1 +- stain and shifted
    # by +- stain optical-density units (Tellez et al. 2018); 0 = off
    stain: float = 0.0
    # [low, high]: each stain's concentration scaled by a factor drawn log-uniformly from this
    # range instead of 1 +- stain (the shift stays +- stain); for slides from other labs
    stain_scale: tuple[float, float] | None = None
    sharpness: float = 0.0  # probability of a random sharpness change


BEST_NAME = "best.safetensors"  # the best epoch's checkpoint, in out_dir
AVERAGED_NAME = "averaged.safetensors"  # with average_with_start: it averaged with the start


def average_partner(cfg: "TrainConfig") -> str | None:
    """The checkpoint the run's best is averaged with: ``average_with``, else its start."""
    return (cfg.average_with or cfg.init_checkpoint) if cfg.average_with_start else None


def result_name(cfg: "TrainConfig") -> str:
    """The file in ``cfg.out_dir`` that holds the model the run is for."""
    return AVERAGED_NAME if cfg.average_with_start else BEST_NAME


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init_checkpoint: str | None = None  # fine-tune: start from these weights (its model config wins); default = the shipped model
    freeze_encoder: bool = False  # fine-tune the decoder and head only (encoder parameters fixed)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    oversample: OversampleConfig = field(default_factory=OversampleConfig)
    loss: str = "ce_dice"  # ce | weighted_ce | bce | dice | log_cosh_dice | focal | ce_dice (see losses.py)
    class_weights: list[float] | str | None = None  # explicit list, "auto" (median frequency) or "inverse"
    # weight of the distance head's loss (model.distance_head), added to the class loss
    distance_loss_weight: float = 1.0
    # weight of the squared error of the distance map's gradients over nuclei (HoVer-Net's MSGE;
    # training.losses.distance_gradient_error): sharpens the dip between touching nuclei; 0 = off
    distance_gradient_weight: float = 0.0
    # weight of the distance loss on the pixels where two annotated nuclei touch (within
    # nuclei.distance.TOUCH_RADIUS_PX of each other; a fifth of CoNSeP's nucleus pixels): the
    # neck that must stay below the seed threshold, or two nuclei are cut as one; 1 = off
    distance_touch_weight: float = 1.0
    normalization: str | dict = "imagenet"  # imagenet | none | {mean: [...], std: [...]}; written to the checkpoint
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (warm-up then cosine, per step) | constant | plateau (halve on val plateau)
    epochs: int = 30
    batch_size: int = 8
    # keep an exponential moving average of the weights, moved towards them by 1 - ema_decay
    # after every step (training.ema); validation, the best checkpoint and all after the run use
    # it. 0 = off; 0.995 averages over the last ~200 steps
    ema_decay: float = 0.0
    patience: int = 0  # early stop after this many epochs without improvement; 0 = off
    min_delta: float = 0.0
    monitor: str = "val_loss"  # val_loss (lower is better) or a metric name such as val_miou
    # monitor val_least_gain_over_start: the checkpoint every epoch is compared with, where it is not
    # the start ("default": the shipped model): a chain of fine-tunes judged against the model it
    # would replace, each scored as it segments (its own threshold, class weights, nucleus settings)
    compare_with: str | None = None
    quadratic_stop: QuadraticStopConfig = field(default_factory=QuadraticStopConfig)
    seed: int = 0
    repeats: int = 1  # train this many times with seeds seed, seed+1, ...; report mean +- std
    deterministic: bool = True  # deterministic algorithms where torch has them
    amp: str = "auto"  # auto (CUDA: fp16; a CPU with AMX: bf16; else off) | on | off: mixed precision
    channels_last: str = "auto"  # auto (on for CUDA) | on | off
    device: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    resume: str | None = None  # a resume.safetensors written by an earlier run: continue it exactly
    # write resume.safetensors after every epoch; it holds the weights and both Adam moments, so
    # about 3x a full-precision checkpoint on disk: turn it off where disk is tight
    save_resume: bool = True
    out_dir: str = "runs/model"
    save_half: bool = False  # store fp16 weights in the checkpoint
    model_card: str = ""
    pixel_size_um: float | None = None
    # at the end, tune the best checkpoint's foreground threshold on the validation images
    # (as ``medseg tune-threshold`` does): true | false | auto (when the init_checkpoint has a
    # tuned threshold). Untuned, a fine-tuned checkpoint keeps its init_checkpoint's threshold.
    tune_threshold: bool | str = "auto"
    # then (and after averaging, on the run's result): choose its class weights on the validation
    # images of the class sets (as ``medseg tune-classes``); the nuclei stay as they are
    tune_classes: bool = False
    # last (after tune_threshold): the best checkpoint averaged with init_checkpoint, this share on
    # the run's weights (as ``medseg average``; batch norm averaged, the tuned threshold kept),
    # written to averaged.safetensors: the run's result and a next stage's start. 0 = off
    average_with_start: float = 0.0
    # the checkpoint averaged with, where it is not init_checkpoint (e.g. the start of a chain of
    # fine-tunes); in a staged config an earlier stage's name means that stage's result
    average_with: str | None = None
    # settings that replace the ones above when the run's device is a CUDA GPU (a larger batch
    # and crops, loader workers, ...); sections merge key by key, as stages do
    on_cuda: dict = field(default_factory=dict)

    def for_device(self, device_type: str) -> "TrainConfig":
        """This config as it runs on ``device_type``: with ``on_cuda`` applied on a CUDA GPU."""
        if device_type != "cuda" or not self.on_cuda:
            return self
        return TrainConfig.from_dict({**merge_settings(self.to_dict(), self.on_cuda), "on_cuda": {}})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "TrainConfig":
        """Settings from a mapping, checked (types, ranges, contradictions); errors name ``source``
        (the config file) when given."""
        try:
            return cls._from_dict(dict(data))
        except TrainConfigError as exc:
            if source is None:
                raise
            raise TrainConfigError(f"{source}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: dict) -> "TrainConfig":
        sections = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig,
                    "oversample": OversampleConfig, "quadratic_stop": QuadraticStopConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TrainConfigError(f"Unknown training setting(s): {', '.join(sorted(unknown))}.")
        for key, section in sections.items():
            if key in data and isinstance(data[key], dict):
                sub_known = {f.name for f in fields(section)}
                bad = set(data[key]) - sub_known
                if bad:
                    raise TrainConfigError(f"Unknown {key} setting(s): {', '.join(sorted(bad))}.")
                data[key] = section(**data[key])
            elif key in data and not isinstance(data[key], section):
                raise TrainConfigError(f"'{key}' must be a mapping of settings, not {data[key]!r}.")
        cfg = cls(**data)
        for prefix, obj in (("", cfg), ("data.", cfg.data), ("augment.", cfg.augment),
                            ("oversample.", cfg.oversample), ("quadratic_stop.", cfg.quadratic_stop)):
            _coerce_floats(obj, prefix)
        for name in ("init_checkpoint", "average_with", "compare_with"):
            if getattr(cfg, name) == "default":  # the shipped model, as ``--model default`` names it
                from ..models import DEFAULT_MODEL_PATH

                setattr(cfg, name, str(DEFAULT_MODEL_PATH))
        if isinstance(cfg.data.dataset, str):
            cfg.data.dataset = [cfg.data.dataset]
        if isinstance(cfg.data.datasets, list):
            cfg.data.datasets = [_dataset_spec(spec, number) for number, spec in enumerate(cfg.data.datasets, 1)]
        if isinstance(cfg.augment.scale, list):
            cfg.augment.scale = tuple(cfg.augment.scale)
        if cfg.augment.stain_scale is not None:
            try:
                cfg.augment.stain_scale = tuple(float(v) for v in cfg.augment.stain_scale)
            except (TypeError, ValueError):
                raise TrainConfigError(f"augment.stain_scale must be [low, high], got {cfg.augment.stain_scale!r}.") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse contradictions that would otherwise surface mid-training."""
        def bad(msg):
            raise TrainConfigError(msg)

        wrong = type_errors(self)
        if wrong:  # before the checks below, which compare values of the declared types
            bad("; ".join(wrong) + ".")

        if self.loss.lower() not in LOSSES:
            bad(f"Unknown loss '{self.loss}'. Choose one of: {', '.join(LOSSES)}.")
        if self.optimizer.lower() not in ("adam", "adamw"):
            bad(f"Unknown optimizer '{self.optimizer}' (adam, adamw).")
        if self.schedule not in ("cosine", "constant", "plateau"):
            bad(f"Unknown schedule '{self.schedule}' (cosine, constant, plateau).")
        for name in ("amp", "channels_last"):
            if str(getattr(self, name)).lower() not in ("auto", "on", "off", "true", "false"):
                bad(f"{name} must be auto, on or off, not '{getattr(self, name)}'.")
        if not 0.0 <= self.average_with_start <= 1.0:
            bad(f"average_with_start must lie between 0 and 1 (the run's share), not {self.average_with_start}.")
        if self.average_with_start and not self.init_checkpoint:
            bad("average_with_start averages the run with its start: it needs an init_checkpoint.")
        if self.average_with and not self.average_with_start:
            bad(f"average_with ({self.average_with}) needs average_with_start, the run's share of the average.")
        if isinstance(self.class_weights, str) and self.class_weights not in ("auto", "inverse"):
            bad(f"class_weights must be a list of numbers, 'auto' or 'inverse', not '{self.class_weights}'.")
        if isinstance(self.normalization, str) and self.normalization not in ("imagenet", "none"):
            bad(f"normalization must be 'imagenet', 'none' or {{mean: [...], std: [...]}}, not '{self.normalization}'.")
        if isinstance(self.normalization, dict):
            norm = self.normalization
            if set(norm) != {"mean", "std"}:
                bad("normalization as a mapping needs exactly 'mean' and 'std'.")
            numbers = [v for key in ("mean", "std") for v in (norm[key] if isinstance(norm[key], list) else [None])]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
                bad(f"normalization mean and std must be lists of numbers, got {norm}.")
            if min(norm["std"], default=0) <= 0:
                bad(f"normalization std must be above 0, got {norm['std']}.")
        # crop_size 0 (whole images) had trained without any augmentation, and failed mid-run on sets
        # of several image sizes: every training sample is a random crop
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                 ("repeats", self.repeats, 1), ("data.crop_size", self.data.crop_size, 1),
                                 ("quadratic_stop.window", self.quadratic_stop.window, 3)):
            if not isinstance(value, int) or value < low:
                bad(f"{name} must be an integer of at least {low}, got {value!r}.")
        if self.monitor not in MONITORS:  # 'loss' had passed, then failed after a whole epoch
            meant = f" (did you mean 'val_{self.monitor}'?)" if f"val_{self.monitor}" in MONITORS else ""
            bad(f"monitor '{self.monitor}' is not one of {', '.join(MONITORS)}{meant}.")
        if self.monitor == LEAST_GAIN_MONITOR and not self.init_checkpoint:
            bad(f"monitor '{LEAST_GAIN_MONITOR}' compares every epoch with the model the run starts from; "
                "set init_checkpoint (e.g. 'default'), or choose another monitor.")
        if self.compare_with and self.monitor != LEAST_GAIN_MONITOR:
            bad(f"compare_with names the model monitor '{LEAST_GAIN_MONITOR}' compares each epoch with; "
                f"this run's monitor is '{self.monitor}'.")
        if not 0 <= self.data.val_fraction < 1:
            bad(f"data.val_fraction must lie in [0, 1), got {self.data.val_fraction}.")
        if self.lr <= 0:
            bad(f"lr must be positive, got {self.lr}.")
        if not (isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool)
                and 0 <= self.ema_decay < 1):
            bad(f"ema_decay must be a number in [0, 1) (0 = off; 0.995 averages over ~200 steps), got {self.ema_decay!r}.")
        if not (isinstance(self.distance_loss_weight, (int, float)) and self.distance_loss_weight >= 0):
            bad(f"distance_loss_weight must be a number of at least 0, got {self.distance_loss_weight!r}.")
        if not (isinstance(self.distance_touch_weight, (int, float)) and not isinstance(self.distance_touch_weight, bool)
                and self.distance_touch_weight > 0):
            bad(f"distance_touch_weight must be a number above 0 (1 = off), got {self.distance_touch_weight!r}.")
        elif self.distance_touch_weight != 1 and not self.model.distance_head:
            bad(f"distance_touch_weight {self.distance_touch_weight} weighs the distance head's loss, but "
                "model.distance_head is false: set it true, or leave distance_touch_weight at 1.")
        if not (isinstance(self.distance_gradient_weight, (int, float)) and self.distance_gradient_weight >= 0):
            bad(f"distance_gradient_weight must be a number of at least 0, got {self.distance_gradient_weight!r}.")
        for name, value in (("data.samples_per_epoch", self.data.samples_per_epoch),
                            ("data.num_workers", self.data.num_workers), ("num_threads", self.num_threads),
                            ("patience", self.patience), ("data.crops_per_image", self.data.crops_per_image)):
            if value < 0:
                bad(f"{name} must be at least 0 (0: {'off' if name == 'patience' else 'the default'}), got {value}.")
        if self.weight_decay < 0:
            bad(f"weight_decay must be at least 0, got {self.weight_decay}.")
        # each had been taken and done nothing: min_delta -1 made every epoch progress (patience
        # never stopped), factor -1 oversampled nothing
        quad, over = self.quadratic_stop, self.oversample
        for name, value in (("min_delta", self.min_delta), ("quadratic_stop.threshold", quad.threshold),
                            ("quadratic_stop.patience", quad.patience), ("quadratic_stop.start", quad.start),
                            ("oversample.factor", over.factor), ("oversample.below", over.below),
                            ("oversample.min_share", over.min_share)):
            if value < 0:
                bad(f"{name} must be at least 0, got {value}.")
        for name, value in (("oversample.below", over.below), ("oversample.min_share", over.min_share)):
            if value > 1:
                bad(f"{name} is a share of pixels, from 0 to 1, got {value}.")
        if over.classes and not over.factor:
            bad(f"oversample.classes {over.classes} are oversampled only with oversample.factor of at least 1 "
                "(extra copies of each rich image), got 0.")
        aug = self.augment
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(aug, name) < 1:
                bad(f"augment.{name} must lie in [0, 1) (a jitter of up to that share), got {getattr(aug, name)}.")
        if not 0 <= aug.hue <= 0.5:
            bad(f"augment.hue must lie in [0, 0.5] (a share of the colour circle), got {aug.hue}.")
        if aug.scale is not None and not (len(aug.scale) == 2 and 0 < aug.scale[0] <= aug.scale[1] <= 10):
            bad(f"augment.scale must be [low, high] with 0 < low <= high <= 10, got {list(aug.scale)}.")
        try:
            groups = re.compile(self.data.group_pattern).groups
        except re.error as exc:
            bad(f"data.group_pattern {self.data.group_pattern!r} is not a regular expression ({exc}).")
        if groups < 1:
            bad(f"data.group_pattern {self.data.group_pattern!r} needs a group, (...), that names a patch's source "
                "image: e.g. '^(.*)_\\d+$' for train_1_003 -> train_1.")
        if not 0 <= self.augment.stain < 1:
            bad(f"augment.stain must lie in [0, 1), got {self.augment.stain}.")
        ss = self.augment.stain_scale
        if ss is not None and not (len(ss) == 2 and 0 < ss[0] <= 1 <= ss[1] <= 10):
            bad(f"augment.stain_scale must be [low, high] with 0 < low <= 1 <= high <= 10, got {list(ss)}.")
        self._check_datasets()
        self._check_run_options()
        depth_error = encoder_depth_error(self.model)
        if depth_error:  # before the data are read
            bad(depth_error)
        for error in ignored_settings_errors(self.model):
            bad(error + ".")
        if self.data.crop_size % self.model.output_stride:
            bad(f"data.crop_size {self.data.crop_size} must be a multiple of {self.model.output_stride} for this model.")

    def _check_run_options(self) -> None:
        """``tune_threshold`` and the ``on_cuda`` settings (checked as the config they make on CUDA)."""
        if isinstance(self.tune_threshold, str) and self.tune_threshold != "auto":
            raise TrainConfigError(f"tune_threshold must be true, false or auto, not '{self.tune_threshold}'.")
        if not self.on_cuda:
            return
        if "on_cuda" in self.on_cuda or "stages" in self.on_cuda:
            raise TrainConfigError("on_cuda cannot hold 'on_cuda' or 'stages'.")
        try:
            self.for_device("cuda")
        except TrainConfigError as exc:
            raise TrainConfigError(f"on_cuda: {exc}") from None

    def _check_datasets(self) -> None:
        specs = self.data.datasets
        if specs and self.data.dataset:
            raise TrainConfigError("data.dataset and data.datasets are both set: list every folder under "
                                   "data.datasets (each with its labels kind and weight) and drop data.dataset.")
        for number, spec in enumerate(specs, 1):
            where = f"data.datasets[{number}] ({spec.path or 'no path'})"
            if not spec.path:
                raise TrainConfigError(f"{where}: give the dataset folder as 'path'.")
            if spec.labels not in LABEL_KINDS:
                raise TrainConfigError(f"{where}: labels must be {' or '.join(LABEL_KINDS)}, not '{spec.labels}'.")
            if spec.distance not in DISTANCE_TRUST:
                raise TrainConfigError(f"{where}: distance must be one of {', '.join(DISTANCE_TRUST)}, "
                                       f"not '{spec.distance}'.")
            if not spec.weight > 0:
                raise TrainConfigError(f"{where}: weight must be above 0, got {spec.weight}.")
        paths = [spec.path for spec in specs]
        if len(set(paths)) < len(paths):
            raise TrainConfigError(f"data.datasets names a folder twice: {', '.join(paths)}.")

    def dataset_specs(self) -> list[DatasetSpec]:
        """Every training folder as a spec: ``data.datasets``, or ``data.dataset``'s folders as class sets."""
        return list(self.data.datasets) or [DatasetSpec(path) for path in self.data.dataset]


def merge_settings(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dataset_spec(spec, number: int) -> DatasetSpec:
    """One ``data.datasets`` entry: a mapping of DatasetSpec settings, or a folder (a class set)."""
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, str):
        return DatasetSpec(spec)
    if not isinstance(spec, dict):
        raise TrainConfigError(f"data.datasets[{number}] must be a folder or a mapping "
                               f"{{path: ..., labels: classes|binary, weight: ...}}, not {spec!r}.")
    bad = set(spec) - {f.name for f in fields(DatasetSpec)}
    if bad:
        raise TrainConfigError(f"Unknown data.datasets[{number}] setting(s): {', '.join(sorted(bad))}.")
    out = DatasetSpec(**spec)
    _coerce_floats(out, f"data.datasets[{number}].")
    wrong = type_errors(out, f"data.datasets[{number}].")
    if wrong:
        raise TrainConfigError("; ".join(wrong) + ".")
    return out


def _coerce_floats(obj, prefix: str = "") -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept it where a number is expected."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str) and str(f.type) in ("float", "float | None"):
            try:
                setattr(obj, f.name, float(value))
            except ValueError:
                raise TrainConfigError(f"{prefix}{f.name} must be a number, got '{value}'.") from None


def _parse_value(key: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise TrainConfigError(f"--set {key}: '{text}' is not a value YAML can read ({problem}).") from None


def read_config_mapping(path: str | Path | None) -> dict:
    """The settings of a YAML config file as a plain mapping (empty for ``None``)."""
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        raise TrainConfigError(f"Config file '{path}' is a folder: give the YAML file (e.g. configs/default.yaml).")
    if not path.is_file():
        raise TrainConfigError(f"Config file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise TrainConfigError(f"Config file '{path}' is not valid YAML{where}: {problem}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"Config file '{path}' cannot be read as text ({exc}).") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping of settings.")
    # Relative dataset paths are relative to the current directory, as users type them.
    return data


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to ``data`` in place."""
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"--set expects key=value, got '{item}'.")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {key}: '{part}' is not a section of settings.")
        node[parts[-1]] = _parse_value(key, value)
        if parts[0] != "on_cuda":
            _drop_from_on_cuda(data, parts)
    return data


def _drop_from_on_cuda(data: dict, parts: list[str]) -> None:
    """A setting given with --set wins on every device: ``on_cuda``'s own value for it goes (a
    tiny --set epochs=1 check had run 40 epochs of 256² crops, batch 64, on a GPU, unsaid)."""
    node = data.get("on_cuda")
    for part in parts[:-1]:
        if not isinstance(node, dict):
            return
        node = node.get(part)
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key.sub=value`` overrides (values parsed as YAML).

    A config with ``stages`` describes several runs: read it with ``load_train_stages``.
    """
    data = read_config_mapping(path)
    if "stages" in data:
        raise TrainConfigError(f"{path} describes training stages: run it with 'medseg train' "
                               "or read it with load_train_stages.")
    return TrainConfig.from_dict(apply_overrides(data, overrides), source=path)
