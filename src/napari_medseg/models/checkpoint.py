"""The one checkpoint format: a ``.safetensors`` file whose header carries JSON metadata.

Nothing is executed on load: safetensors holds raw tensors only, and the metadata is
JSON. Pickled PyTorch checkpoints (``torch.save``) are refused, never unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..colors import class_colors
from ..io.images import atomic_write
from .config import ModelConfig, ModelConfigError
from .registry import build_model, without_removed
from .fields import type_errors
from .weights import CheckpointError, check_not_pickle, read_state_dict, write_safetensors

if TYPE_CHECKING:  # reading a checkpoint's metadata needs no torch: it loads with the weights
    import torch
    from torch import nn

FORMAT = "napari-medseg-checkpoint"
RESUME_KEY = "napari_medseg_resume"  # the header key of a training run's resume file (training.resume)
FORMAT_VERSION = 1
METADATA_KEY = "napari_medseg"
# Mean/std applied after scaling pixels to [0, 1] (ImageNet statistics by default).
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Metric names of checkpoints written before each number had one name.
LEGACY_METRIC_NAMES = {"binary_dice": "nucleus_dice", "binary_iou": "nucleus_iou", "argmax_dice": "argmax_nucleus_dice"}


def current_metric_names(record):
    """``record`` (metadata, nested) with old metric names replaced: ``binary_dice`` and the
    summaries' bare ``dice`` (beside ``bpq`` or a tuned threshold) are ``nucleus_dice``; a
    per-class ``dice`` stays the class's Dice."""
    if isinstance(record, list):
        return [current_metric_names(r) for r in record]
    if not isinstance(record, dict):
        return record
    summary = "bpq" in record or "argmax_dice" in record
    out = {}
    for key, value in record.items():
        key = "nucleus_dice" if key == "dice" and summary else LEGACY_METRIC_NAMES.get(key, key)
        out[key] = current_metric_names(value)
    return out


@dataclass
class CheckpointMeta:
    model: ModelConfig
    classes: list[str]
    colors: list[list[int]] = field(default_factory=list)
    normalization: dict = field(default_factory=lambda: dict(IMAGENET_NORMALIZATION))
    pixel_size_um: float | None = None
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    model_card: str = ""
    # nucleus (foreground) probability above which a pixel gets its likeliest foreground class;
    # None = plain argmax over all classes. Tuned on validation images (``medseg tune-threshold``).
    foreground_threshold: float | None = None
    # the model's own nucleus post-processing (``InstanceSettings`` fields: marker_threshold,
    # min_size, min_marker_size), chosen by ``medseg tune-nuclei``; empty = InstanceSettings' defaults
    instance_settings: dict = field(default_factory=dict)
    # one weight per foreground class, scaling its probability when a foreground pixel's class is
    # chosen (``inference.blend.classify``; which pixels are foreground does not change). Tuned on
    # held-out images by ``medseg tune-classes``; empty = the plain likeliest class.
    class_choice_weights: list[float] = field(default_factory=list)
    # how much the network's input is enlarged over the model's pixel grid when it runs: a network
    # trained with upward scale augmentation may separate small nuclei best on a finer grid. The
    # maps come back to the model's grid, where the nuclei are cut with ``instance_settings``.
    # Measured on held-out images (``benchmarks/tune_network_zoom.py``); 1.0 = as trained, and what
    # a fine-tune from it records (its validation, which picks its epoch, runs at 1).
    network_zoom: float = 1.0
    versions: dict = field(default_factory=dict)
    created: str = ""

    def __post_init__(self):
        if not self.colors:
            self.colors = [list(c) for c in class_colors(self.classes)]

    def check(self, source: str) -> None:
        """Refuses metadata whose values cannot work (types, ranges), naming the key."""
        wrong = type_errors(self)
        if not wrong:
            wrong = _value_errors(self)
        if wrong:
            raise CheckpointError(f"{source}: invalid metadata: {'; '.join(wrong)}. "
                                  "The file was edited or written by another program; use the checkpoint as trained.")

    def to_json(self) -> str:
        data = asdict(self)
        data["format"], data["format_version"] = FORMAT, FORMAT_VERSION
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> "CheckpointMeta":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"{source}: metadata is not valid JSON ({exc}).") from exc
        if data.pop("format", None) != FORMAT:
            raise CheckpointError(f"{source}: not a napari-medseg checkpoint (metadata 'format' is missing or wrong).")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: checkpoint format version {version}; this napari-medseg reads {FORMAT_VERSION}.")
        for section in ("metrics", "training"):
            data[section] = current_metric_names(data.get(section, {}))
        try:
            data["model"] = ModelConfig.from_dict(data["model"])
            meta = cls(**data)
        except (KeyError, TypeError, ModelConfigError) as exc:
            raise CheckpointError(f"{source}: incomplete or unknown metadata ({exc}).") from exc
        meta.check(source)
        if len(meta.classes) != meta.model.num_classes:
            raise CheckpointError(
                f"{source}: lists {len(meta.classes)} class names but the model has {meta.model.num_classes} outputs."
            )
        if len(meta.colors) != len(meta.classes):
            raise CheckpointError(f"{source}: {len(meta.colors)} colours for {len(meta.classes)} classes.")
        return meta


def _finite_numbers(values) -> bool:
    return isinstance(values, list) and bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _value_errors(meta: CheckpointMeta) -> list[str]:
    """Ranges and shapes of the metadata values whose types fit."""
    wrong = []
    if not all(isinstance(c, str) and c for c in meta.classes):
        wrong.append(f"classes must be a list of names, got {meta.classes!r}")
    if not all(isinstance(c, (list, tuple)) and len(c) in (3, 4) and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
               for c in meta.colors):
        wrong.append("colors must be [r, g, b] lists of integers 0-255")
    norm = meta.normalization
    if set(norm) != {"mean", "std"} or not _finite_numbers(norm["mean"]) or not _finite_numbers(norm["std"]):
        wrong.append(f"normalization must be {{mean: [...], std: [...]}} of finite numbers, got {norm!r}")
    elif min(norm["std"]) <= 0:
        wrong.append(f"normalization std must be above 0, got {norm['std']}")
    elif len(norm["mean"]) != len(norm["std"]) or len(norm["std"]) not in (1, meta.model.in_channels):
        wrong.append(f"normalization needs 1 or {meta.model.in_channels} values per list, got {norm!r}")
    threshold = meta.foreground_threshold
    if threshold is not None and not 0 < threshold < 1:
        wrong.append(f"foreground_threshold must lie strictly between 0 and 1, got {threshold!r}")
    wrong += _instance_settings_errors(meta.instance_settings)
    weights = meta.class_choice_weights
    if weights and (not _finite_numbers(weights) or len(weights) != meta.model.num_classes - 1 or min(weights) <= 0):
        wrong.append(f"class_choice_weights must be {meta.model.num_classes - 1} numbers above 0 (one per "
                     f"foreground class), got {weights!r}")
    if meta.pixel_size_um is not None and not meta.pixel_size_um > 0:
        wrong.append(f"pixel_size_um must be above 0, got {meta.pixel_size_um!r}")
    if not is_network_zoom(meta.network_zoom):
        wrong.append(f"network_zoom must lie between {MIN_NETWORK_ZOOM} and {MAX_NETWORK_ZOOM}, got {meta.network_zoom!r}")
    if meta.model.num_classes < 2 or meta.model.in_channels < 1:
        wrong.append("model.num_classes must be at least 2 and model.in_channels at least 1")
    return wrong


# a network run on a grid more than twice as fine (or coarse) as it was trained on is no longer
# the model that was measured; 2x already costs 4x the work
MIN_NETWORK_ZOOM, MAX_NETWORK_ZOOM = 0.5, 2.0


def is_network_zoom(value) -> bool:
    """A number a model can run its network at (a checkpoint's record, a run's setting)."""
    return _finite_numbers([value]) and MIN_NETWORK_ZOOM <= value <= MAX_NETWORK_ZOOM

# the nucleus settings a checkpoint may record (nuclei.watershed.TUNED_FIELDS): marker threshold
# strictly between 0 and 1, the two sizes whole px
RECORDED_INSTANCE_FIELDS = ("marker_threshold", "min_size", "min_marker_size")


def _instance_settings_errors(record: dict) -> list[str]:
    unknown = sorted(set(record) - set(RECORDED_INSTANCE_FIELDS))
    if unknown:
        return [f"instance_settings may hold {', '.join(RECORDED_INSTANCE_FIELDS)}, not {', '.join(map(str, unknown))}"]
    wrong = []
    marker = record.get("marker_threshold", 0.5)
    if not (isinstance(marker, (int, float)) and not isinstance(marker, bool) and 0 < marker < 1):
        wrong.append(f"instance_settings.marker_threshold must lie strictly between 0 and 1, got {marker!r}")
    for name in ("min_size", "min_marker_size"):
        value = record.get(name, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            wrong.append(f"instance_settings.{name} must be a whole number of px, 0 or more, got {value!r}")
    return wrong


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("napari-medseg", "torch", "segmentation-models-pytorch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("*.safetensors"))
        hint = f" such as {inside[0]}" if inside else ""
        raise CheckpointError(f"Checkpoint '{path}' is a folder, not a file: give a .safetensors checkpoint{hint}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist: give 'default' (the shipped model) or the path "
                              "of a .safetensors checkpoint.")
    check_not_pickle(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            header = fh.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path.name}: corrupt or truncated safetensors file ({exc}).") from exc
    if METADATA_KEY not in header and RESUME_KEY in header:
        raise CheckpointError(
            f"{path.name} is a resume file (for 'medseg train --resume'), not a model checkpoint: "
            f"use the best.safetensors in {path.parent}.")
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path.name} has no napari-medseg metadata: it holds bare weights. Build the model "
            "and save it with napari_medseg.models.save_checkpoint to record classes and normalisation."
        )
    return CheckpointMeta.from_json(header[METADATA_KEY], source=path.name)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta, half: bool = False) -> Path:
    """Write weights + metadata atomically; ``half`` stores float weights as fp16 (half the size)."""
    path = Path(path)
    meta.versions = meta.versions or package_versions()
    meta.created = meta.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor.contiguous()
    # safetensors creates its file 0600: atomic_write gives it the mode of any new file of the
    # user's (a checkpoint is meant to be shared); reading the umask by setting it, as this did,
    # could give a file another thread made meanwhile mode 0666
    atomic_write(path, lambda tmp: write_safetensors(state, tmp, {METADATA_KEY: meta.to_json()}, path))
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Build the model a checkpoint describes and load its weights, checking that both agree."""
    import torch

    path = Path(path)
    meta = read_meta(path)
    try:
        # The file holds every weight: skip the encoder init file, which may not exist here.
        model = build_model(replace(meta.model, encoder_weights=None))
    except ModelConfigError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    # a file written before the encoder's unused stages were removed holds their weights too
    state = without_removed(read_state_dict(path), model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path.name}: weights do not match a {meta.model.network_name} model "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:3]})."
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path.name}: tensor '{key}' has shape {tuple(tensor.shape)} but the model described in its "
                f"metadata ({meta.model.num_classes} classes: {', '.join(meta.classes)}) needs "
                f"{tuple(expected[key].shape)}. The weights were trained for another class count or architecture."
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path.name}: tensor '{key}' holds NaN or infinite weights (the training diverged, or the file "
                "was damaged); such a model segments nothing. Use an earlier checkpoint or retrain, e.g. with a lower lr.")
        state[key] = tensor.to(expected[key].dtype)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
