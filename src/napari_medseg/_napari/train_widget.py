"""Train widget: train or fine-tune a model on a dataset folder or on layers painted in the viewer.

The widget is thin: it checks the inputs, builds a ``TrainConfig`` and calls the headless
``train()`` of ``napari_medseg.training``. As in careamics-napari, training runs in its own
thread and sends typed updates (``BatchDone``, ``EpochDone``, ``TrainingDone``, plus this
module's ``Preview`` and ``TrainingFailed``) through a queue; a napari ``thread_worker``
generator takes them off the queue and yields them to the GUI thread, which moves the
progress bar, extends the loss/metric plot and shows the validation prediction.

Stop sets an event that the trainer checks before each batch, so training ends after the
current batch and keeps the best checkpoint written so far. A finished model is listed in
the Segment widget (``model_list.trained_models``).

Data from viewer layers: an image layer and a Labels layer of class ids (0 = background,
every pixel counts, unpainted pixels included). The image is cut into tiles of about
``tile size`` pixels and every tile is its own group, so a validation split holds out whole
tiles that are never trained on (neighbouring tiles are alike, so the scores are
optimistic). With a single tile there is nothing to hold out: the run trains on it alone
and the best checkpoint is chosen by training loss.
"""

from __future__ import annotations

import gc
import queue
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar,
                              PushButton, SpinBox)
from psygnal import Signal

from ..errors import MedsegError
from ..devices import available_devices
from ..io.dataset import open_dataset, source_group
from ..io.images import to_rgb_float
from ..models import ARCHITECTURES, TESTED_ENCODERS, ModelConfig, read_meta, resolve_model_path
from ..training.config import AugmentConfig, DataConfig, TrainConfig
from ..training.data import LabelledImage
from ..training.losses import LOSSES as CORE_LOSSES
from ..training.trainer import BatchDone, EpochDone, TrainingDone, train
from .layers import METADATA_KEY, class_labels_kwargs, layer_classes
from .model_list import trained_models

if TYPE_CHECKING:
    import napari

FROM_FOLDER = "dataset folder"
FROM_LAYERS = "image + labels layers"
NEW_MODEL = "new model (from scratch)"
DEFAULT_MODEL = "default (shipped)"  # the same names as the Segment widget's
FILE_MODEL = "checkpoint file..."
LOSSES = ("ce_dice", *(name for name in CORE_LOSSES if name != "ce_dice"))  # the trainer's list, its default first
NO_AUGMENTATION = AugmentConfig(flip=False, rotate90=False, scale=None, brightness=0.0, contrast=0.0, saturation=0.0,
                                hue=0.0, sharpness=0.0)  # random crops only
MONITORS = {"validation loss": "val_loss", "validation mIoU": "val_miou", "validation mean class Dice": "val_mean_dice",
            "validation bPQ (nuclei)": "val_bpq"}
PREVIEW_KIND = "training-preview"


class InputError(MedsegError, ValueError):
    """The widget's inputs cannot start a training run (message is for the user)."""


@dataclass
class TrainingFailed:
    """Training could not start or could not go on; nothing was registered."""

    message: str


@dataclass
class Preview:
    """The best checkpoint's prediction on a validation sample (or a training one, without validation)."""

    epoch: int
    name: str
    labels: np.ndarray  # full shape of the labels layer (layers) or of the sample (folder)
    classes: list[str]
    colors: list
    image: np.ndarray | None = None  # the sample itself, when it is not in the viewer (folder data)


@dataclass
class _LayerSource:
    """Where a tile came from, to place its preview back on the painted layer."""

    shape: tuple
    scale: tuple
    translate: tuple
    regions: dict = field(default_factory=dict)  # item name -> (plane index or None, y0, y1, x0, x1)


def release_memory() -> None:
    """Give cached GPU memory back once the trainer's model and optimizer are gone."""
    import torch

    if torch.cuda.is_available():
        gc.collect()  # tensors caught in reference cycles (an exception's traceback) go too
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gc.collect()
        mps.empty_cache()


def remove_run_dir(run_dir: Path, top: Path) -> None:
    """Delete a run's folder, then the parents this run created up to ``top`` while they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder != top.parent and folder.is_relative_to(top):
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's folder) or already gone
            break
        folder = folder.parent


def tile_bounds(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into ``round(length / tile)`` (at least 1) near-equal spans."""
    n = max(1, int(round(length / tile)))
    edges = np.linspace(0, length, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def layer_items(image: np.ndarray, rgb: bool, labels: np.ndarray, num_classes: int, in_channels: int, tile: int,
                name: str) -> tuple[list[LabelledImage], dict]:
    """Tiles of a painted image (or of each plane of a stack) as labelled images, one group per tile.

    Raises ``InputError`` when the layers do not fit together or the labels do not fit the classes.
    """
    spatial = image.shape[:-1] if rgb else image.shape
    if labels.shape != spatial:
        raise InputError(f"The labels have shape {labels.shape}, but the image's pixels are {spatial}; "
                         "choose a Labels layer painted on this image.")
    if len(spatial) not in (2, 3):
        raise InputError(f"Training takes a 2-D image or a stack of 2-D images; this one has shape {image.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"The labels are {labels.dtype}, not integer class ids.")
    low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
    if low < 0 or high >= num_classes:
        raise InputError(f"The labels hold class id {high if high >= num_classes else low}, but the model has "
                         f"{num_classes} classes (ids 0 to {num_classes - 1}).")
    if high == 0:
        raise InputError("The labels layer is empty (all background): paint some nuclei first.")
    planes = [None] if len(spatial) == 2 else list(range(spatial[0]))
    items, regions = [], {}
    for p in planes:
        plane = image if p is None else image[p]
        try:
            pixels = to_rgb_float(np.asarray(plane), in_channels)  # normalised over the whole plane, then cut
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        plane_labels = labels if p is None else labels[p]
        for y0, y1 in tile_bounds(pixels.shape[0], tile):
            for x0, x1 in tile_bounds(pixels.shape[1], tile):
                where = f"{'' if p is None else f'[{p}]'}[{y0}:{y1}, {x0}:{x1}]"
                item_name = f"{name}{where}"
                items.append(LabelledImage(item_name, item_name, np.ascontiguousarray(pixels[y0:y1, x0:x1]),
                                           np.ascontiguousarray(plane_labels[y0:y1, x0:x1], dtype=np.uint8)))
                regions[item_name] = (p, y0, y1, x0, x1)
    return items, regions


class TrainingJob:
    """One training run, free of Qt: ``train()`` in a thread, its updates through a queue.

    ``updates()`` is the generator a napari ``thread_worker`` runs; ``run_here(handle)``
    trains in the caller's thread and hands each update to ``handle`` at once (tests, scripts).
    """

    def __init__(self, cfg: TrainConfig, items: tuple[list[LabelledImage], list[str]] | None = None,
                 preview: bool = True, layer_source: _LayerSource | None = None,
                 cleanup: Path | None = None):
        self.cfg = cfg
        self.items = items  # None: the trainer reads cfg.data.dataset itself
        self.preview = preview
        self.layer_source = layer_source
        self._cleanup = cleanup  # the topmost folder this run created: removed (if empty) with no checkpoint
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._preview_item: LabelledImage | None = None

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        """End after the current batch; the best checkpoint so far is kept."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- the training thread ------------------------------------------------------------------
    def _train(self, emit: Callable[[object], None]) -> None:
        """Always ends with one ``TrainingDone`` or ``TrainingFailed``; frees GPU memory first."""
        outcome: object
        try:
            outcome = train(self.cfg, on_update=emit, should_stop=self._stop.is_set, items=self.items)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message for the user
            outcome = TrainingFailed(str(exc) or type(exc).__name__)
        finally:
            release_memory()
        if self._cleanup is not None and getattr(outcome, "checkpoint", None) is None:
            remove_run_dir(Path(self.cfg.out_dir), self._cleanup)
        emit(outcome)

    def _pick_preview_item(self, val_groups: list[str]) -> LabelledImage | None:
        """The first sample of the validation groups the trainer recorded (else the first sample)."""
        if self.items is not None:
            return next((it for it in self.items[0] if it.group in val_groups), self.items[0][0])
        for folder in self.cfg.data.dataset:  # grouped as load_dataset_folders groups them
            ds = open_dataset(folder, require_labels=True)
            for stem in ds.stems:
                group = source_group(stem, ds.root.name, self.cfg.data.group_pattern)
                if group in val_groups or not val_groups:
                    sample = ds.load(stem)
                    return LabelledImage(stem, group, to_rgb_float(sample.image, self.cfg.model.in_channels),
                                         sample.labels.astype(np.uint8))
        return None

    # -- the consumer side ----------------------------------------------------------------------
    def _follow(self, update) -> list:
        """The update and whatever the widget should see after it (a fresh preview)."""
        out = [update]
        if isinstance(update, EpochDone) and update.best and self.preview:
            preview = self._make_preview(update.epoch)
            if preview is not None:
                out.append(preview)
        return out

    def _make_preview(self, epoch: int) -> Preview | None:
        """The best checkpoint's class map of the preview sample; ``None`` if it cannot be made.

        A preview is a view, never a reason to stop training: its errors are swallowed.
        """
        from ..inference.segmenter import Segmenter

        checkpoint = Path(self.cfg.out_dir) / "best.safetensors"
        try:
            segmenter = Segmenter.load(checkpoint, device="cpu")  # leaves the training device alone
            try:
                if self._preview_item is None:
                    self._preview_item = self._pick_preview_item(list(segmenter.meta.data.get("val_groups") or []))
                item = self._preview_item
                if item is None:
                    return None
                pred = segmenter.segment(item.image)
            finally:
                segmenter.release()
        except Exception:  # noqa: BLE001
            return None
        image = item.image
        if self.layer_source is not None:  # back into the painted layer's frame
            p, y0, y1, x0, x1 = self.layer_source.regions[item.name]
            full = np.zeros(self.layer_source.shape, np.uint8)
            (full if p is None else full[p])[y0:y1, x0:x1] = pred
            pred, image = full, None
        return Preview(epoch, item.name, pred, segmenter.classes, segmenter.meta.colors, image)

    def updates(self):
        """Generator for a napari thread worker: start training, yield its updates until it ends."""
        thread = threading.Thread(target=self._train, args=(self._queue.put,), name="napari-medseg-training",
                                  daemon=True)
        thread.start()
        try:
            while True:
                try:
                    update = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if not thread.is_alive() and self._queue.empty():
                        yield TrainingFailed("The training thread ended without a result.")
                        return
                    continue
                yield from self._follow(update)
                if isinstance(update, (TrainingDone, TrainingFailed)):
                    return
        finally:  # also when the worker is quit (viewer closed): end training, wait for it
            self._stop.set()
            thread.join()

    def run_here(self, handle: Callable[[object], None]) -> None:
        def emit(update):
            for item in self._follow(update):
                handle(item)

        self._train(emit)


class LossPlot:
    """Training and validation loss (top) and validation mIoU / Dice (bottom), by epoch."""

    def __init__(self, theme: str | None = None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 3.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.loss_ax, self.metric_ax = self.figure.subplots(2, 1, sharex=True)
        self.lines = {
            "batch_loss": self.loss_ax.plot([], [], lw=0.6, alpha=0.45, color="tab:blue", label="batch")[0],
            "train_loss": self.loss_ax.plot([], [], "o-", ms=3, color="tab:blue", label="train")[0],
            "val_loss": self.loss_ax.plot([], [], "o-", ms=3, color="tab:orange", label="validation")[0],
            "miou": self.metric_ax.plot([], [], "o-", ms=3, color="tab:green", label="mIoU")[0],
            "mean_dice": self.metric_ax.plot([], [], "o-", ms=3, color="tab:purple", label="mean class Dice")[0],
            "bpq": self.metric_ax.plot([], [], "o-", ms=3, color="tab:red", label="bPQ")[0],
        }
        self.loss_ax.set_ylabel("loss")
        self.metric_ax.set_ylabel("validation")
        self.metric_ax.set_xlabel("epoch")
        self.metric_ax.set_ylim(0, 1)
        for ax in (self.loss_ax, self.metric_ax):
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="x-small")
            ax.tick_params(labelsize="small")
        self.best_marker = self.loss_ax.axvline(np.nan, color="grey", ls=":", lw=1)
        self._apply_theme(theme)
        self.clear()

    def _apply_theme(self, theme: str | None) -> None:
        """napari's panel colours (dark or light) instead of matplotlib's white."""
        try:
            from napari.utils.theme import get_theme

            colors = get_theme(theme or "dark")
            back, text, grid = colors.background.as_hex(), colors.text.as_hex(), colors.primary.as_hex()
        except Exception:  # noqa: BLE001 - an unknown theme keeps matplotlib's look
            return
        self.figure.set_facecolor(back)
        for ax in (self.loss_ax, self.metric_ax):
            ax.set_facecolor(back)
            ax.tick_params(colors=text)
            ax.xaxis.label.set_color(text)
            ax.yaxis.label.set_color(text)
            for spine in ax.spines.values():
                spine.set_color(grid)
            legend = ax.get_legend()
            legend.get_frame().set_facecolor(back)
            legend.get_frame().set_edgecolor(grid)
            for t in legend.get_texts():
                t.set_color(text)

    def clear(self) -> None:
        self.data = {name: ([], []) for name in self.lines}
        self._refresh()

    def add(self, name: str, x: float, y: float) -> None:
        if y is None or not np.isfinite(y):
            return
        xs, ys = self.data[name]
        xs.append(float(x))
        ys.append(float(y))

    def mark_best(self, epoch: int) -> None:
        self.best_marker.set_xdata([epoch, epoch])

    def _refresh(self) -> None:
        for name, line in self.lines.items():
            line.set_data(*self.data[name])
        for ax in (self.loss_ax, self.metric_ax):
            ax.relim()
            ax.autoscale_view(scaley=ax is self.loss_ax)
        self.canvas.draw_idle()

    def draw(self) -> None:
        self._refresh()


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


class TrainWidget(Container):
    """Train a model, or fine-tune one on corrected layers, with a live loss plot and Stop."""

    update_received = Signal(object)  # every update, after the widget has handled it

    def __init__(self, viewer: "napari.viewer.Viewer"):
        super().__init__()
        self._viewer = viewer
        self._worker = None
        self._job: TrainingJob | None = None
        self.result: TrainingDone | None = None
        self.error: str | None = None
        self.trained_name: str | None = None
        self.preview_layers: list = []
        self._steps = 1
        self._epochs = 1

        # data
        self.source = ComboBox(label="train on", choices=[FROM_FOLDER, FROM_LAYERS], value=FROM_FOLDER)
        self.dataset = FileEdit(label="dataset folder", mode="d")
        self.image_layer = ComboBox(label="image", choices=self._image_layers)
        self.labels_layer = ComboBox(label="labels", choices=self._labels_layers)
        self.tile_size = SpinBox(label="tile size", value=256, min=32, max=4096, step=32,
                                 tooltip="The painted image is cut into tiles of about this size; "
                                         "validation holds out whole tiles.")
        self.val_fraction = FloatSpinBox(label="validation", value=0.15, min=0.0, max=0.9, step=0.05,
                                         tooltip="Fraction of source images (or tiles) held out for validation.")
        # model
        self.start_from = ComboBox(label="start from", choices=self._start_choices, value=NEW_MODEL)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.architecture = ComboBox(label="architecture", choices=list(ARCHITECTURES), value="unet")
        self.encoder = ComboBox(label="encoder", choices=list(TESTED_ENCODERS), value="resnet34")
        self.encoder_depth = SpinBox(label="encoder depth", value=5, min=3, max=5)
        self.freeze_encoder = CheckBox(text="freeze encoder", value=False, tooltip="Train the decoder only.")
        self.distance_head = CheckBox(
            text="distance head (separates touching nuclei)", value=False,
            tooltip="One more output: each nucleus's distance to its edge, learnt from the dataset's instances/ "
                    "(or from the watershed of the labels where there are none). Added to a model without one "
                    "when fine-tuning.")
        # optimisation
        self.loss = ComboBox(label="loss", choices=list(LOSSES), value="ce_dice")
        self.epochs = SpinBox(label="epochs", value=20, min=1, max=10000)
        self.lr = FloatSpinBox(label="learning rate", value=1e-3, min=1e-6, max=1.0, step=1e-6)
        try:  # arrows change the leading digit (1e-3 -> 1.1e-3), six decimals shown
            self.lr.native.setStepType(self.lr.native.StepType.AdaptiveDecimalStepType)
        except AttributeError:
            pass
        self.batch_size = SpinBox(label="batch size", value=8, min=1, max=512)
        self.crop_size = SpinBox(label="crop size", value=256, min=32, max=2048, step=32)
        self.crops_per_image = SpinBox(label="crops per image", value=1, min=1, max=256)
        self.augment = CheckBox(text="augmentation (flips, rotations, scale, colour)", value=True)
        self.patience = SpinBox(label="early stop after", value=0, min=0, max=1000,
                                tooltip="Epochs without improvement before stopping; 0 = never.")
        self.monitor = ComboBox(label="best by", choices=list(MONITORS), value="validation loss")
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")
        # output
        self.output_dir = FileEdit(label="save in", mode="d", value=str(Path.home() / "napari-medseg" / "models"))
        self.model_name = LineEdit(label="model name", value="model")
        self.show_preview = CheckBox(text="show validation prediction", value=True)
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(label="batches", value=0, min=0, max=1)
        self.status = Label(value="")
        self.extend([self.source, self.dataset, self.image_layer, self.labels_layer, self.tile_size,
                     self.val_fraction, self.start_from, self.checkpoint, self.architecture, self.encoder,
                     self.encoder_depth, self.freeze_encoder, self.distance_head, self.loss, self.epochs, self.lr, self.batch_size,
                     self.crop_size, self.crops_per_image, self.augment, self.patience, self.monitor, self.device,
                     self.output_dir, self.model_name, self.show_preview, self.train_button, self.stop_button,
                     self.progress, self.status])
        try:
            self.plot: LossPlot | None = LossPlot(getattr(viewer, "theme", None))
            self.native.layout().addWidget(self.plot.canvas)
        except ImportError:  # matplotlib missing: train without the plot
            self.plot = None
            self.status.value = "(install matplotlib for the loss plot)"

        self.status.native.setWordWrap(True)
        self.source.changed.connect(self._on_source_changed)
        self.start_from.changed.connect(self._update_visibility)
        self.train_button.changed.connect(lambda: self.run())
        self.stop_button.changed.connect(lambda: self.stop())
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        trained_models.changed.connect(self.start_from.reset_choices)
        self.reset_choices()
        self._update_visibility()

    # -- choices --------------------------------------------------------------------------------
    def _image_layers(self, _widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _labels_layers(self, _widget=None) -> list:
        from napari.layers import Labels

        return [layer for layer in self._viewer.layers if isinstance(layer, Labels)
                and layer.metadata.get(METADATA_KEY, {}).get("kind") not in ("instances", "errors", PREVIEW_KIND)]

    def _start_choices(self, _widget=None) -> list:
        return [NEW_MODEL, DEFAULT_MODEL, *trained_models.names(), FILE_MODEL]

    def _update_visibility(self, *_):
        layers = self.source.value == FROM_LAYERS
        self.dataset.visible = not layers
        for w in (self.image_layer, self.labels_layer, self.tile_size):
            w.visible = layers
        scratch = self.start_from.value == NEW_MODEL
        self.checkpoint.visible = self.start_from.value == FILE_MODEL
        for w in (self.architecture, self.encoder, self.encoder_depth):
            w.visible = scratch

    def _on_source_changed(self, source) -> None:
        if source == FROM_LAYERS and self.start_from.value == NEW_MODEL:
            self.start_from.value = DEFAULT_MODEL  # painted corrections fine-tune the current model
        self._update_visibility()

    # -- inputs ---------------------------------------------------------------------------------
    def _start_checkpoint(self) -> Path | None:
        choice = self.start_from.value
        if choice == NEW_MODEL:
            return None
        if choice == DEFAULT_MODEL:
            return resolve_model_path("default")
        if choice == FILE_MODEL:
            path = Path(str(self.checkpoint.value))
            if not path.is_file():
                raise InputError(f"Choose an existing .safetensors checkpoint to start from (got '{path}').")
            return path
        path = trained_models.path(choice)
        if path is None:
            raise InputError(f"The model '{choice}' is no longer on disk.")
        return path

    def _run_dir(self) -> tuple[Path, Path]:
        """A new, writable folder for this run, and the topmost folder this created (for cleanup)."""
        name = self.model_name.value.strip()
        if not name or not re.fullmatch(r"[\w.\- ]+", name) or name in (".", ".."):
            raise InputError(f"Give the model a plain name (letters, digits, '-', '_', '.'), not '{name}'.")
        base = Path(str(self.output_dir.value)).expanduser()
        run_dir, n = base / name, 2
        while run_dir.exists():
            run_dir, n = base / f"{name}-{n}", n + 1
        top = run_dir
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            run_dir.mkdir(parents=True)
            probe = run_dir / ".write-test"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as exc:
            remove_run_dir(run_dir, top)
            raise InputError(f"Cannot write the model to '{run_dir}': {exc.strerror or exc}.") from exc
        return run_dir, top

    def _prepare(self) -> TrainingJob:
        """Check every input and build the job; raises ``InputError`` with a message for the user."""
        start = self._start_checkpoint()
        start_meta = None
        if start is not None:
            try:
                start_meta = read_meta(start)
            except Exception as exc:  # noqa: BLE001 - not a checkpoint we can use
                raise InputError(f"Cannot start from '{start.name}': {exc}") from exc
        in_channels = start_meta.model.in_channels if start_meta else 3
        layer_source = None
        if self.source.value == FROM_FOLDER:
            folder = Path(str(self.dataset.value)).expanduser()
            try:
                ds = open_dataset(folder, require_labels=True)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            classes = ds.classes
            if start_meta is not None and start_meta.classes != classes:
                raise InputError(f"'{start.name}' was trained for classes {start_meta.classes}, but {folder.name} "
                                 f"has {classes}; start from a new model or a model with these classes.")
            datasets, items = [str(folder)], None
            val_fraction = self.val_fraction.value
        else:
            image_layer, labels_layer = self.image_layer.value, self.labels_layer.value
            if image_layer is None:
                raise InputError("Choose an image layer to train on (open or paint over an image first).")
            if labels_layer is None:
                raise InputError("Choose a Labels layer with the class of every pixel (paint or correct one).")
            if getattr(image_layer, "multiscale", False) or getattr(labels_layer, "multiscale", False):
                raise InputError("Multiscale layers cannot be trained on; use a single-resolution image.")
            recorded = layer_classes(labels_layer)
            if start_meta is not None:
                classes = list(start_meta.classes)
                if recorded and recorded != classes:
                    raise InputError(f"'{labels_layer.name}' has classes {recorded}, but the model to fine-tune "
                                     f"has {classes}.")
            else:
                top = int(np.asarray(labels_layer.data).max(initial=0))
                classes = recorded or ["background"] + [f"class {i}" for i in range(1, max(top, 1) + 1)]
            image, labels = np.asarray(image_layer.data), np.asarray(labels_layer.data)
            items, regions = layer_items(image, bool(image_layer.rgb), labels, len(classes), in_channels,
                                         self.tile_size.value, image_layer.name)
            layer_source = _LayerSource(labels.shape, tuple(labels_layer.scale), tuple(labels_layer.translate),
                                        regions)
            datasets = []
            val_fraction = self.val_fraction.value if len(items) > 1 else 0.0
            items = (items, classes)

        if start_meta is not None:
            model = start_meta.model
            model.distance_head = model.distance_head or bool(self.distance_head.value)
        else:
            model = ModelConfig(self.architecture.value, self.encoder.value, in_channels=in_channels,
                                num_classes=len(classes), encoder_depth=self.encoder_depth.value,
                                distance_head=bool(self.distance_head.value))
        stride = model.output_stride
        if self.crop_size.value % stride:
            raise InputError(f"The crop size must be a multiple of {stride} for this model "
                             f"(got {self.crop_size.value}).")
        settings = dict(
            model=model, init_checkpoint=str(start) if start else None,
            data=DataConfig(dataset=datasets, val_fraction=val_fraction, crop_size=self.crop_size.value,
                            crops_per_image=self.crops_per_image.value),
            augment=AugmentConfig() if self.augment.value else NO_AUGMENTATION,
            loss=self.loss.value, lr=float(self.lr.value), epochs=self.epochs.value, batch_size=self.batch_size.value,
            patience=self.patience.value, monitor=MONITORS[self.monitor.value], device=self.device.value,
            pixel_size_um=start_meta.pixel_size_um if start_meta else None,
        )
        settings["freeze_encoder"] = bool(self.freeze_encoder.value)
        cfg = TrainConfig(**settings)
        try:  # the trainer's own consistency checks, before anything is made
            cfg.check()
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        run_dir, created = self._run_dir()  # last: nothing is made unless every other input is fine
        cfg.out_dir = str(run_dir)
        return TrainingJob(cfg, items, preview=self.show_preview.value, layer_source=layer_source, cleanup=created)

    # -- actions --------------------------------------------------------------------------------
    def run(self, threaded: bool = True):
        """Train. ``threaded=False`` trains in the caller's thread (tests, scripts) and returns the result."""
        if self._job is not None:
            self._fail("A training run is already going; stop it first.")
            return None
        self.result, self.error, self.trained_name = None, None, None
        try:
            job = self._prepare()
        except InputError as exc:
            self._fail(str(exc))
            return None
        self._job = job
        self._epochs = job.cfg.epochs
        self._steps = 1
        self.progress.max, self.progress.value = 1, 0
        if self.plot is not None:
            self.plot.clear()
        where = "" if job.cfg.data.val_fraction > 0 or self.source.value == FROM_FOLDER else \
            " (one tile: no validation, best by training loss)"
        self.status.value = f"Training into {job.cfg.out_dir}{where}..."
        self._set_running(True)
        if not threaded:
            job.run_here(self._on_update)
            return self.result
        self.native.destroyed.connect(lambda *_: job.stop())  # widget or viewer closed: end the run too

        from napari.qt.threading import create_worker

        worker = create_worker(job.updates)
        worker.yielded.connect(self._on_update)
        worker.errored.connect(lambda exc: self._on_update(TrainingFailed(str(exc))))
        worker.finished.connect(self._on_worker_finished)
        self._worker = worker
        worker.start()
        return worker

    def stop(self) -> None:
        """Ask training to end after the current batch; the best checkpoint so far is kept."""
        if self._job is not None and not self._job.stop_requested:
            self._job.stop()
            self.stop_button.enabled = False
            self.status.value = "Stopping after the current batch..."

    def _set_running(self, running: bool) -> None:
        self.train_button.enabled = not running
        self.stop_button.enabled = running

    def _fail(self, message: str) -> None:
        self.error = message
        self.status.value = f"Error: {message}"
        _notify_error(message)

    def _on_worker_finished(self) -> None:
        self._worker = None
        if self._job is not None:  # the worker ended without a final update (quit)
            self._job = None
            self._set_running(False)

    # -- updates from the training thread ---------------------------------------------------------------
    def _on_update(self, update) -> None:
        if isinstance(update, BatchDone):
            self._on_batch(update)
        elif isinstance(update, EpochDone):
            self._on_epoch(update)
        elif isinstance(update, Preview):
            self._show_preview(update)
        elif isinstance(update, TrainingDone):
            self._on_done(update)
        elif isinstance(update, TrainingFailed):
            self._job = None
            self._set_running(False)
            self._fail(f"Training failed: {update.message}")
        self.update_received.emit(update)

    def _on_batch(self, b: BatchDone) -> None:
        self._steps = b.steps
        self.progress.max = self._epochs * b.steps
        self.progress.value = min(self.progress.max, (b.epoch - 1) * b.steps + b.step)
        if self.plot is not None:
            self.plot.add("batch_loss", b.epoch - 1 + b.step / b.steps, b.loss)
            if b.step == b.steps or b.step % 5 == 0:
                self.plot.draw()

    def _on_epoch(self, e: EpochDone) -> None:
        self.progress.value = min(self.progress.max, e.epoch * self._steps)
        if self.plot is not None:
            self.plot.add("train_loss", e.epoch, e.train_loss)
            if e.metrics:
                self.plot.add("val_loss", e.epoch, e.val_loss)
                self.plot.add("miou", e.epoch, e.metrics.get("miou"))
                self.plot.add("mean_dice", e.epoch, e.metrics.get("mean_dice"))
                self.plot.add("bpq", e.epoch, e.metrics.get("bpq"))
            if e.best:
                self.plot.mark_best(e.epoch)
            self.plot.draw()
        scores = (f", validation loss {e.val_loss:.3f}, mIoU {e.metrics.get('miou', float('nan')):.3f}, "
                  f"mean class Dice {e.metrics.get('mean_dice', float('nan')):.3f}, "
                  f"bPQ {e.metrics.get('bpq', float('nan')):.3f}") if e.metrics else ""
        stopping = " Stopping after the current batch..." if self._job is not None and self._job.stop_requested else ""
        self.status.value = (f"Epoch {e.epoch}/{e.epochs}: training loss {e.train_loss:.3f}{scores}"
                             f"{' (best so far, saved)' if e.best else ''} in {e.seconds:.1f} s.{stopping}")

    def _show_preview(self, p: Preview) -> None:
        name = "training preview"
        layers = [l for l in self.preview_layers if l in self._viewer.layers]
        if self._job is not None and self._job.layer_source is not None:
            src = self._job.layer_source
            extra = {"scale": src.scale, "translate": src.translate}
            image_layer = None
        else:
            extra = {}
            image_layer = next((l for l in layers if l.metadata.get(METADATA_KEY, {}).get("kind") == "preview-image"),
                               None)
            if image_layer is None:
                image_layer = self._viewer.add_image(p.image, name=f"{name} image", rgb=p.image.shape[-1] == 3,
                                                     metadata={METADATA_KEY: {"kind": "preview-image"}})
            else:
                image_layer.data = p.image
        labels_layer = next((l for l in layers if l.metadata.get(METADATA_KEY, {}).get("kind") == PREVIEW_KIND), None)
        if labels_layer is None or labels_layer.data.shape != p.labels.shape:
            if labels_layer is not None:
                self._viewer.layers.remove(labels_layer)
            kwargs = class_labels_kwargs(name, p.classes, p.colors, opacity=0.6, **extra)
            kwargs["metadata"][METADATA_KEY]["kind"] = PREVIEW_KIND
            labels_layer = self._viewer.add_labels(p.labels, **kwargs)
        else:
            labels_layer.data = p.labels
        labels_layer.name = f"{name} (epoch {p.epoch}: {p.name})"
        self.preview_layers = [l for l in (image_layer, labels_layer) if l is not None]

    def _on_done(self, done: TrainingDone) -> None:
        self._job = None
        self._set_running(False)
        self.result = done
        if self.plot is not None:
            self.plot.draw()
        why = f" ({done.reason})" if done.stopped_early else ""
        if done.checkpoint is None:
            self.status.value = (f"Training ended before the first epoch finished{why}; no model was saved "
                                 "and nothing was added to the model list.")
            return
        self.progress.value = self.progress.max if not done.stopped_early else self.progress.value
        self.trained_name = trained_models.add(done.checkpoint, Path(done.checkpoint).parent.name)
        self.status.value = (f"Done{why}: best epoch {done.best_epoch}, saved {done.checkpoint}. "
                             f"Choose '{self.trained_name}' in the Segment widget.")
