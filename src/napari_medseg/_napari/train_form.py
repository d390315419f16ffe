"""The Train widget's form as plain values, and the one function that turns it into a run.

Free of Qt and of the viewer (as careamics-napari does it: form state -> pure config ->
worker): the widget reads its controls into a ``TrainForm``, ``plan_training`` checks every
input and builds the ``TrainConfig`` (plus the tiles of painted layers), and ``TrainingJob``
runs it. A form's defaults are the core's, so the widget, the CLI and a YAML config start
from the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from ..io.dataset import open_dataset
from ..models import ModelConfig, read_meta, resolve_model_path
from ..models.checkpoint import CheckpointMeta
from ..training.config import LOSSES as CORE_LOSSES
from ..training.config import LEAST_GAIN_MONITOR, AugmentConfig, DataConfig, DatasetSpec, TrainConfig
from ..training.items import LabelledImage
from ..training.tiles import DEFAULT_TILE, layer_items
from .common import CLASS_ID_LIMIT, WidgetInputError, class_map_top, numbered_classes
from .model_list import DEFAULT_MODEL, FILE_MODEL, MODELS_DIR, trained_models
from .training_job import LayerSource

FROM_FOLDER = "dataset folder"
FROM_LAYERS = "image + labels layers"
NEW_MODEL = "new model (from scratch)"
LOSSES = ("ce_dice", *(name for name in CORE_LOSSES if name != "ce_dice"))  # the trainer's list, its default first
NO_AUGMENTATION = AugmentConfig(flip=False, rotate90=False, scale=None, brightness=0.0, contrast=0.0, saturation=0.0,
                                hue=0.0, sharpness=0.0)  # random crops only
PAINT_CLASSES = "Train on a class map: one id per class (e.g. 1 = nucleus), not one per nucleus."
SMALLEST_LOSS = "least loss vs the start model (fine-tune)"
MONITORS = {"validation loss": "val_loss", "validation mIoU": "val_miou", "validation mean class Dice": "val_mean_dice",
            "validation bPQ (nuclei)": "val_bpq",
            # a fine-tune on a lab's own slides: keep the epoch that loses least, in nucleus Dice or bPQ, against the start
            SMALLEST_LOSS: LEAST_GAIN_MONITOR}
INTERACTIVE_EPOCHS = 20  # fewer than a scripted run's default: a first look in the viewer comes sooner

_TRAIN, _DATA, _MODEL = TrainConfig(), DataConfig(), ModelConfig()


@dataclass
class PaintedLayers:
    """The chosen image and Labels layers as the config needs them (``None``: not chosen)."""

    image: np.ndarray | None
    labels: np.ndarray | None
    rgb: bool = False
    name: str = "image"  # the image layer's name: tiles are named after it
    labels_name: str = "labels"
    classes: list[str] | None = None  # recorded on the labels layer by this plugin
    multiscale: bool = False
    # where the labels layer sits on the canvas (``layers.placement`` of all its axes: scale,
    # translate, units, affine), for the preview to land on it
    placement: dict = field(default_factory=dict)
    # (y, x) of the labels' first pixel in the image, for a region's result (Segment's drawn shape
    # or field of view) that sits on its whole image; None: the two cover the same pixels
    origin: tuple[int, int] | None = None
    pixel_size_um: float | None = None  # the image layer's (its scale in µm): tiles are resampled to the run's


@dataclass
class TrainForm:
    """Every value of the Train widget's form. The defaults are the core's (``TrainConfig``,
    ``DataConfig``, ``ModelConfig``) but for fewer epochs; the widget's controls start at them."""

    source: str = FROM_FOLDER
    dataset: str = ""
    layers: PaintedLayers | None = None
    tile_size: int = DEFAULT_TILE
    val_fraction: float = _DATA.val_fraction
    start_from: str = NEW_MODEL
    checkpoint: str = ""
    architecture: str = _MODEL.architecture
    encoder: str = _MODEL.encoder
    encoder_depth: int = _MODEL.encoder_depth
    freeze_encoder: bool = _TRAIN.freeze_encoder
    distance_head: bool = _MODEL.distance_head
    loss: str = _TRAIN.loss
    epochs: int = INTERACTIVE_EPOCHS
    lr: float = _TRAIN.lr
    batch_size: int = _TRAIN.batch_size
    crop_size: int = _DATA.crop_size
    crops_per_image: int = _DATA.crops_per_image
    augment: bool = True
    patience: int = _TRAIN.patience
    monitor: str = next(name for name, key in MONITORS.items() if key == _TRAIN.monitor)
    device: str = _TRAIN.device
    output_dir: str = str(MODELS_DIR)
    model_name: str = "model"
    show_preview: bool = True


@dataclass
class TrainingPlan:
    """A checked run: its config (``out_dir`` still to be made) and, for painted layers, the tiles."""

    cfg: TrainConfig
    items: tuple[list[LabelledImage], list[str]] | None = None  # (tiles, classes); None: cfg.data.dataset
    layer_source: LayerSource | None = None
    start_threshold: float | None = None  # the start model's tuned foreground threshold, kept by fine-tuning


def plan_training(form: TrainForm) -> TrainingPlan:
    """Check every input of ``form`` and build the run; raises a ``MedsegError`` whose message
    tells the user what to change. Reads the start checkpoint and the dataset folder; writes nothing."""
    check_model_name(form.model_name)
    if _not_chosen(form.output_dir):
        raise WidgetInputError("Choose a folder to save the model in ('save in').")
    start, start_meta = start_checkpoint(form)
    in_channels = start_meta.model.in_channels if start_meta else _MODEL.in_channels
    mixed = []
    if form.source == FROM_FOLDER:
        classes = folder_classes(form, start, start_meta)
        datasets, val_fraction = [str(Path(form.dataset).expanduser())], form.val_fraction
        items, layer_source = None, None
        if start_meta is not None and classes != start_meta.classes:  # nucleus-only: its nuclei, not its classes
            mixed, datasets, classes = [DatasetSpec(datasets[0], labels="binary")], [], list(start_meta.classes)
    else:
        items, layer_source = painted_tiles(form, start_meta, in_channels)
        classes, datasets = items[1], []
        # one tile: nothing to hold out, so it trains on it alone and picks the best by training loss
        val_fraction = form.val_fraction if len(items[0]) > 1 else 0.0
    model = _model_config(form, start_meta, classes, in_channels)
    if items is not None:
        check_tile_sizes(form, items[0], model.output_stride)
    if form.crop_size % model.output_stride:
        raise WidgetInputError(f"The crop size must be a multiple of {model.output_stride} for this model "
                               f"(got {form.crop_size}).")
    if form.monitor == SMALLEST_LOSS and start is None:
        raise WidgetInputError(f"'Best by: {SMALLEST_LOSS}' compares every epoch with the model training starts "
                               "from; choose a model to start from, or another 'best by'.")
    cfg = TrainConfig(
        model=model, init_checkpoint=str(start) if start else None, freeze_encoder=form.freeze_encoder,
        data=DataConfig(dataset=datasets, datasets=mixed, val_fraction=val_fraction, crop_size=form.crop_size,
                        crops_per_image=form.crops_per_image),
        augment=AugmentConfig() if form.augment else NO_AUGMENTATION,
        loss=form.loss, lr=float(form.lr), epochs=form.epochs, batch_size=form.batch_size, patience=form.patience,
        monitor=MONITORS[form.monitor], device=form.device,
        pixel_size_um=start_meta.pixel_size_um if start_meta else None,
        # the widget never continues a run: an 80 MB resume file beside every model had been left unused
        save_resume=False,
    )
    cfg.check()  # the trainer's own consistency checks, before anything is made
    return TrainingPlan(cfg, items, layer_source, start_meta.foreground_threshold if start_meta else None)


def _not_chosen(path: str) -> bool:
    """An empty folder box: its value reads as '.' (``str(Path(''))``)."""
    return path.strip() in ("", ".")


def check_model_name(name: str) -> None:
    name = name.strip()
    if not name or not re.fullmatch(r"[\w.\- ]+", name) or name in (".", ".."):
        raise WidgetInputError(f"Give the model a plain name (letters, digits, '-', '_', '.'), not '{name}'.")


def start_checkpoint(form: TrainForm) -> tuple[Path | None, CheckpointMeta | None]:
    """The checkpoint to start from and its metadata; ``(None, None)`` for a new model."""
    choice = form.start_from
    if choice == NEW_MODEL:
        return None, None
    if choice == DEFAULT_MODEL:
        path = resolve_model_path("default")
    elif choice == FILE_MODEL:
        path = Path(form.checkpoint)
        if not path.is_file():
            raise WidgetInputError(f"Choose an existing .safetensors checkpoint to start from (got '{path}').")
    else:
        path = trained_models.path(choice)
        if path is None:
            raise WidgetInputError(f"The model '{choice}' is no longer on disk.")
    try:
        return path, read_meta(path)
    except MedsegError as exc:  # not a checkpoint we can use
        raise WidgetInputError(f"Cannot start from '{path.name}': {exc}") from exc


def folder_classes(form: TrainForm, start: Path | None, start_meta: CheckpointMeta | None) -> list[str]:
    """The dataset folder's classes, checked against the model to fine-tune."""
    if _not_chosen(form.dataset):  # not the folder napari was started in, named as 'not a dataset folder'
        raise WidgetInputError("Choose a dataset folder to train on (images/, labels/ and classes.json).")
    folder = Path(form.dataset).expanduser()
    classes = open_dataset(folder, require_labels=True).classes
    nucleus_only = len(classes) == 2 and start_meta is not None and len(start_meta.classes) > 2
    if start_meta is not None and start_meta.classes != classes and not nucleus_only:
        raise WidgetInputError(f"'{start.name}' was trained for classes {start_meta.classes}, but {folder.name} "
                               f"has {classes}; start from a new model or a model with these classes.")
    # a lab's nucleus masks fine-tune the model's nuclei (nucleus vs background, its distance head),
    # never its class split, as the CLI's 'labels: binary' does: they had been refused, with advice to
    # start from a new model, which throws the default away
    return classes


def painted_tiles(form: TrainForm, start_meta: CheckpointMeta | None,
                  in_channels: int) -> tuple[tuple[list[LabelledImage], list[str]], LayerSource]:
    """The tiles of the painted layers (each its own validation group) with their classes, and
    where each tile came from."""
    layers = form.layers
    if layers is not None and layers.multiscale:
        raise WidgetInputError("Multiscale layers cannot be trained on; use a single-resolution image.")
    if layers is None or layers.image is None:
        raise WidgetInputError("Choose an image layer to train on (open or paint over an image first).")
    if layers.labels is None:
        raise WidgetInputError("Choose a Labels layer with the class of every pixel (paint or correct one).")
    image = _under_labels(layers)
    names = layers.classes if layers.classes and len(layers.classes) <= CLASS_ID_LIMIT else None
    if start_meta is not None:
        if names and names != start_meta.classes:
            raise WidgetInputError(f"'{layers.labels_name}' has classes {names}, but the model to fine-tune "
                                   f"has {start_meta.classes}.")
        names = list(start_meta.classes)
    top = class_map_top(layers.labels_name, layers.labels, names, instead=PAINT_CLASSES)
    if top == 0:
        raise WidgetInputError(f"'{layers.labels_name}' is empty (all background): paint some nuclei first.")
    classes = names or numbered_classes(top)
    items, regions = layer_items(image, layers.rgb, layers.labels, len(classes), in_channels,
                                 form.tile_size, layers.name)
    items = [replace(item, pixel_size_um=layers.pixel_size_um) for item in items]  # resampled to the run's
    return (items, classes), LayerSource(layers.labels.shape, dict(layers.placement), regions)


def _under_labels(layers: PaintedLayers) -> np.ndarray:
    """The image's pixels under the labels: all of them, or those of the region a region's result
    covers (its ``origin``)."""
    spatial = layers.image.shape[:-1] if layers.rgb else layers.image.shape
    shape = layers.labels.shape
    if shape == spatial:
        return layers.image
    if layers.origin is not None and len(shape) == len(spatial) == 2:
        (y, x), (h, w) = layers.origin, shape
        if 0 <= y and 0 <= x and y + h <= spatial[0] and x + w <= spatial[1]:
            return layers.image[y:y + h, x:x + w]
    raise WidgetInputError(f"'{layers.labels_name}' has shape {shape}, but the pixels of "
                           f"'{layers.name}' are {spatial}; choose a Labels layer painted on this image.")


def check_tile_sizes(form: TrainForm, tiles: list[LabelledImage], least: int) -> None:
    """Refuse painted layers, or tiles of them, smaller than ``least`` px (the model's output
    stride) on a side: padded up to a crop, a few pixels train on nothing (the loss became NaN)."""
    layers = form.layers
    height, width = layers.labels.shape[-2:]
    if min(height, width) < least:
        raise WidgetInputError(f"'{layers.name}' is {height} x {width} px, smaller than the {least} x {least} px this "
                               "model takes (its output stride); paint on a larger image region.")
    tile_h, tile_w = min(t.image.shape[0] for t in tiles), min(t.image.shape[1] for t in tiles)
    if min(tile_h, tile_w) < least:
        raise WidgetInputError(f"A tile size of {form.tile_size} px cuts '{layers.name}' ({height} x {width} px) into "
                               f"tiles as small as {tile_h} x {tile_w} px, under the {least} px this model takes; "
                               "choose a larger tile size.")


def _model_config(form: TrainForm, start_meta: CheckpointMeta | None, classes: list[str],
                  in_channels: int) -> ModelConfig:
    """The start checkpoint's model (a distance head added if asked for), else a new one."""
    if start_meta is not None:
        model = start_meta.model
        model.distance_head = model.distance_head or form.distance_head
        return model
    return ModelConfig(form.architecture, form.encoder, in_channels=in_channels, num_classes=len(classes),
                       encoder_depth=form.encoder_depth, distance_head=form.distance_head)
