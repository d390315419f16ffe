"""Train widget: train or fine-tune a model on a dataset folder or on layers painted in the viewer.

Form -> plan -> job, as in careamics-napari: the widget reads its controls into a ``TrainForm``,
``plan_training`` (train_form, Qt-free) checks them and builds the ``TrainConfig``, and a
``TrainingJob`` (training_job) runs the headless ``train()`` in a process of its own. Its typed
updates move the progress bar, extend the loss plot (loss_plot) and show the validation
prediction. A finished model is listed in the Segment widget (``model_list.trained_models``).

Data from viewer layers: an image layer and a Labels layer of class ids (0 = background,
every pixel counts, unpainted pixels included), cut into tiles of about ``tile size`` pixels
that are their own groups (``training.tiles``). With a single tile there is nothing to hold
out: the run trains on it alone and the best checkpoint is chosen by training loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, ProgressBar, PushButton,
                              SpinBox)
from psygnal import Signal

from ..errors import MedsegError
from ..models import ARCHITECTURES, TESTED_ENCODERS
from ..training.events import BatchDone, DataSplit, EpochDone, StartScored, TrainingDone
from .common import (add_layers_in_turns, device_choices, follow_devices, report_error, start_worker,
                     warm_label_visuals)
from .dock import ScrollingDock
from .layers import (METADATA_KEY, class_labels_kwargs, image_layers, labels_layers, layer_classes,
                     layer_kind, pixel_size_um, place, placement, region_in, wrapping_label)
from .loss_plot import LossPlot
from .model_list import DEFAULT_MODEL, FILE_MODEL, follow_trained_models, trained_models
from .train_form import (FROM_FOLDER, FROM_LAYERS, LOSSES, MONITORS, NEW_MODEL, PaintedLayers,
                         TrainForm, plan_training)
from .training_job import Preview, TrainingFailed, TrainingJob, failure, make_run_dir

if TYPE_CHECKING:
    import napari

PREVIEW_KIND = "training-preview"
PREVIEW_IMAGE_KIND = "preview-image"
# Stop ends a run at its next batch, of training or of validation: the epoch under way is not kept
STOPPING = "Stopping at the next batch (the epoch under way is not kept; the best checkpoint so far stays)..."
# folded under "advanced settings" (closed at first): the widget fits a 1000 px screen beside others
ADVANCED = ("tile_size", "val_fraction", "architecture", "encoder", "encoder_depth", "freeze_encoder",
            "distance_head", "loss", "lr", "batch_size", "crop_size", "crops_per_image", "augment", "patience",
            "monitor", "show_preview")


def _region_origin(image, image_pixels, labels, labels_pixels) -> tuple[int, int] | None:
    """Where a region's result (``labels``, e.g. Segment's drawn shape corrected by hand) starts in
    the whole ``image`` it sits on; ``None`` for any other pair of layers."""
    if image_pixels is None or labels_pixels is None or labels_pixels.ndim != 2:
        return None
    spatial = image_pixels.shape[:-1] if getattr(image, "rgb", False) else image_pixels.shape
    if len(spatial) != 2 or spatial == labels_pixels.shape:
        return None
    region = region_in(labels, labels_pixels.shape, image, spatial)
    return None if region is None else (region[0].start, region[1].start)


# the core's messages name config keys; in the widget, the control that sets them
CONFIG_KEYS_AS_CONTROLS = {"set data.val_fraction: 0": "set 'validation' to 0 (under 'advanced settings')"}


def _in_widget_words(message: str) -> str:
    for key, control in CONFIG_KEYS_AS_CONTROLS.items():
        message = message.replace(key, control)
    return message


class TrainWidget(ScrollingDock):
    """Train a model, or fine-tune one on corrected layers, with a live loss plot and Stop."""

    update_received = Signal(object)  # every update, after the widget has handled it

    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        warm_label_visuals()  # off the GUI thread: the first result layer is added sooner
        super().__init__()
        self._viewer = napari_viewer
        self._worker = None
        self._job: TrainingJob | None = None
        self.result: TrainingDone | None = None
        self.error: str | None = None
        self.trained_name: str | None = None
        self.preview_layers: list = []
        self._going_in: list = []  # preview layers handed to ``add_layers_in_turns``, not in yet
        self._plot_after_preview = False  # the epoch's plot waits for its preview's layer
        self._steps = self._epochs = 1
        self._training_status = ""
        self._closed = False  # the dock's Qt widget was destroyed (the viewer closed)
        form = TrainForm()  # every control starts at the form's defaults (the core's)
        settings = [*self._data_controls(form), *self._model_controls(form), *self._optimiser_controls(form),
                    *self._output_controls(form)]
        folded = [getattr(self, name) for name in ADVANCED]
        self.show_advanced = CheckBox(text="advanced settings (model, optimiser, tiles)", value=False)
        self.advanced = Container(widgets=folded, labels=True)
        self.extend([*(w for w in settings if w not in folded), self.show_advanced, self.advanced,
                     *self._action_controls()])
        self.span_full_width(self.advanced, self.status, self.split_note)
        self.plot = self._add_plot()
        self._connect()
        follow_devices(self.device, self.native)

    # -- the form ---------------------------------------------------------------------------------
    def _data_controls(self, form: TrainForm) -> list:
        self.source = ComboBox(label="train on", choices=[FROM_FOLDER, FROM_LAYERS], value=form.source)
        self.dataset = FileEdit(label="dataset folder", mode="d")
        self.image_layer = ComboBox(label="image", choices=lambda _w=None: image_layers(self._viewer))
        self.labels_layer = ComboBox(label="labels", choices=self._labels_choices)
        self.tile_size = SpinBox(label="tile size", value=form.tile_size, min=32, max=4096, step=32,
                                 tooltip="The painted image is cut into tiles of about this size; "
                                         "validation holds out whole tiles.")
        self.val_fraction = FloatSpinBox(label="validation", value=form.val_fraction, min=0.0, max=0.9, step=0.05,
                                         tooltip="Fraction of source images (or tiles) held out for validation.")
        return [self.source, self.dataset, self.image_layer, self.labels_layer, self.tile_size, self.val_fraction]

    def _model_controls(self, form: TrainForm) -> list:
        self.start_from = ComboBox(label="start from", choices=self._start_choices, value=form.start_from)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.architecture = ComboBox(label="architecture", choices=list(ARCHITECTURES), value=form.architecture)
        self.encoder = ComboBox(label="encoder", choices=list(TESTED_ENCODERS), value=form.encoder)
        self.encoder_depth = SpinBox(label="encoder depth", value=form.encoder_depth, min=3, max=5)
        self.freeze_encoder = CheckBox(text="freeze encoder", value=form.freeze_encoder,
                                       tooltip="Train the decoder only.")
        self.distance_head = CheckBox(
            text="distance head (separates touching nuclei)", value=form.distance_head,
            tooltip="One more output: each nucleus's distance to its edge, learnt from the dataset's instances/ "
                    "(or from the watershed of the labels where there are none). Added to a model without one "
                    "when fine-tuning.")
        return [self.start_from, self.checkpoint, self.architecture, self.encoder, self.encoder_depth,
                self.freeze_encoder, self.distance_head]

    def _optimiser_controls(self, form: TrainForm) -> list:
        self.loss = ComboBox(label="loss", choices=list(LOSSES), value=form.loss)
        self.epochs = SpinBox(label="epochs", value=form.epochs, min=1, max=10000)
        self.lr = FloatSpinBox(label="learning rate", value=form.lr, min=1e-6, max=1.0, step=1e-6)
        try:  # arrows change the leading digit (1e-3 -> 1.1e-3), six decimals shown
            self.lr.native.setStepType(self.lr.native.StepType.AdaptiveDecimalStepType)
        except AttributeError:
            pass
        self.batch_size = SpinBox(label="batch size", value=form.batch_size, min=1, max=512)
        self.crop_size = SpinBox(label="crop size", value=form.crop_size, min=32, max=2048, step=32)
        self.crops_per_image = SpinBox(label="crops per image", value=form.crops_per_image, min=1, max=256)
        self.augment = CheckBox(text="augmentation (flips, rotations, scale, colour)", value=form.augment)
        self.patience = SpinBox(label="early stop after", value=form.patience, min=0, max=1000,
                                tooltip="Epochs without improvement before stopping; 0 = never.")
        self.monitor = ComboBox(label="best by", choices=list(MONITORS), value=form.monitor)
        self.device = ComboBox(label="device", choices=device_choices, value=form.device)
        return [self.loss, self.epochs, self.lr, self.batch_size, self.crop_size, self.crops_per_image, self.augment,
                self.patience, self.monitor, self.device]

    def _output_controls(self, form: TrainForm) -> list:
        self.output_dir = FileEdit(label="save in", mode="d", value=form.output_dir)
        self.model_name = LineEdit(label="model name", value=form.model_name)
        self.show_preview = CheckBox(text="show validation prediction", value=form.show_preview)
        return [self.output_dir, self.model_name, self.show_preview]

    def _action_controls(self) -> list:
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(label="batches", value=0, min=0, max=1)
        self.status = wrapping_label(value="")
        self.split_note = wrapping_label(value="")  # what trains and what validates, and a split that looks wrong
        self._split_text = ""  # the split's own lines, that the start model's scores are said under
        return [self.train_button, self.stop_button, self.progress, self.status, self.split_note]

    def _add_plot(self) -> LossPlot | None:
        try:
            plot = LossPlot(getattr(self._viewer, "theme", None))
        except ImportError:  # matplotlib missing: train without the plot
            self.status.value = "(install matplotlib for the loss plot)"
            return None
        self.root_native_widget.widget().layout().addWidget(plot.canvas)
        return plot

    def _connect(self) -> None:
        self.advanced.visible = False
        self.show_advanced.changed.connect(lambda shown: setattr(self.advanced, "visible", shown))
        self.source.changed.connect(self._on_source_changed)
        self.start_from.changed.connect(self._update_visibility)
        self.train_button.changed.connect(lambda: self.run())
        self.stop_button.changed.connect(lambda: self.stop())
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        follow_trained_models(self.start_from)
        self.reset_choices()
        self._update_visibility()

    def _labels_choices(self, _widget=None) -> list:
        return labels_layers(self._viewer, exclude=("instances", "errors", PREVIEW_KIND))

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

    def form(self) -> TrainForm:
        """The controls' values, as they are (``plan_training`` checks them)."""
        values = {name: getattr(self, name).value for name in (
            "source", "tile_size", "val_fraction", "start_from", "architecture", "encoder", "encoder_depth",
            "freeze_encoder", "distance_head", "loss", "epochs", "lr", "batch_size", "crop_size", "crops_per_image",
            "augment", "patience", "monitor", "device", "model_name", "show_preview")}
        return TrainForm(**values, dataset=str(self.dataset.value), checkpoint=str(self.checkpoint.value),
                         output_dir=str(self.output_dir.value),
                         layers=self._painted_layers() if self.source.value == FROM_LAYERS else None)

    def _painted_layers(self) -> PaintedLayers:
        image, labels = self.image_layer.value, self.labels_layer.value
        multiscale = any(getattr(layer, "multiscale", False) for layer in (image, labels))

        def pixels(layer):
            return None if layer is None or multiscale else np.asarray(layer.data)

        image_pixels, labels_pixels = pixels(image), pixels(labels)
        return PaintedLayers(image_pixels, labels_pixels, rgb=bool(getattr(image, "rgb", False)),
                             name=getattr(image, "name", "image"), labels_name=getattr(labels, "name", "labels"),
                             classes=layer_classes(labels) if labels is not None else None, multiscale=multiscale,
                             placement=placement(labels, labels.ndim) if labels is not None else {},
                             origin=_region_origin(image, image_pixels, labels, labels_pixels),
                             pixel_size_um=pixel_size_um(image) if image is not None else None)

    # -- actions --------------------------------------------------------------------------------
    def _make_job(self) -> TrainingJob:
        """Check every input and build the job; raises a ``MedsegError`` with a message for the user."""
        form = self.form()
        plan = plan_training(form)
        # last: nothing is made unless every other input is fine
        run_dir, created = make_run_dir(Path(form.output_dir).expanduser(), form.model_name.strip())
        plan.cfg.out_dir = str(run_dir)
        return TrainingJob(plan.cfg, plan.items, preview=form.show_preview, layer_source=plan.layer_source,
                           cleanup=created, start_threshold=plan.start_threshold)

    def run(self, threaded: bool = True):
        """Train. ``threaded=False`` trains in the caller's thread (tests, scripts) and returns the result."""
        if self._job is not None:
            return self._fail("A training run is already going; stop it first.")
        self.result, self.error, self.trained_name = None, None, None
        try:
            job = self._make_job()
        except MedsegError as exc:
            return self._fail(exc)
        self._begin(job)
        if not threaded:
            job.run_here(self._on_update)
            return self.result
        self.native.destroyed.connect(lambda *_: self._on_closed(job))  # widget or viewer closed: end the run too
        self._worker = start_worker(job.updates, on_error=lambda exc: self._on_update(failure(exc)),
                                    yielded=self._on_update, finished=self._on_worker_finished)
        return self._worker

    def _begin(self, job: TrainingJob) -> None:
        self._job = job
        self._epochs, self._steps = job.cfg.epochs, 1
        # busy until the first batch: starting the process, torch, the data and the model take
        # 10-40 s on a CPU, and a bar standing at 0 % looked stuck
        self.progress.max, self.progress.value = 0, 0
        if self.plot is not None:
            self.plot.clear()
        where = "" if job.cfg.data.val_fraction > 0 or self.source.value == FROM_FOLDER else \
            " (one tile: no validation, best by training loss)"
        self._training_status = f"Training into {job.cfg.out_dir}{where}"
        self.split_note.value = self._split_text = ""
        self.status.value = f"Loading PyTorch, the data and the model... {self._training_status}."
        self._set_running(True)

    def stop(self) -> None:
        """Ask training to end after the current batch; the best checkpoint so far is kept."""
        if self._job is not None and not self._job.stop_requested:
            self._job.stop()
            self.stop_button.enabled = False
            self.status.value = STOPPING

    def _on_closed(self, job: TrainingJob) -> None:
        """The dock is gone: the run ends after its batch, and its last updates touch no control
        (each had raised 'wrapped C/C++ object ... has been deleted' into napari's notifications)."""
        self._closed = True
        job.stop()

    def _set_running(self, running: bool) -> None:
        self.train_button.enabled = not running
        self.stop_button.enabled = running
        if not running and self.progress.max == 0:  # ended before its first batch: no longer busy
            self.progress.max = 1

    def _fail(self, error: BaseException | str, prefix: str = "") -> None:
        self.error = report_error(self.status, error, prefix)

    def _on_worker_finished(self) -> None:
        self._worker = None
        if self._closed:
            return
        if self._job is not None:  # the worker ended without a final update (quit)
            self._job = None
            self._set_running(False)

    # -- updates from the training thread ---------------------------------------------------------------
    def _on_update(self, update) -> None:
        if self._closed:
            return
        if isinstance(update, DataSplit):
            self.split_note.value = "\n".join(update.lines() + ([f"Note: {update.note}"] if update.note else []))
            self._split_text = self.split_note.value
        elif isinstance(update, StartScored):  # under the split: first 'scoring...', then the figures
            self.split_note.value = "\n".join(filter(None, [self._split_text, update.note]))
        elif isinstance(update, BatchDone):
            self._on_batch(update)
        elif isinstance(update, EpochDone):
            self._on_epoch(update)
        elif isinstance(update, Preview):
            self._show_preview(update)
        elif isinstance(update, TrainingDone):
            self._on_done(update)
        elif isinstance(update, TrainingFailed):
            self._on_failed(update)
        self.update_received.emit(update)

    def _on_batch(self, b: BatchDone) -> None:
        if self.progress.max == 0 and self._job is not None and not self._job.stop_requested:  # the first batch
            self.status.value = f"{self._training_status}: epoch {b.epoch}/{self._epochs}..."
        self._steps = b.steps
        self.progress.max = self._epochs * b.steps
        self.progress.value = min(self.progress.max, (b.epoch - 1) * b.steps + b.step)
        if self.plot is not None:
            self.plot.add("batch_loss", b.epoch - 1 + b.step / b.steps, b.loss)
            self.plot.draw_now_and_then()  # each epoch's end draws too

    def _on_epoch(self, e: EpochDone) -> None:
        self.progress.value = min(self.progress.max, e.epoch * self._steps)
        if self.plot is not None:
            self._plot_epoch(e)
        scores = (f", validation loss {e.val_loss:.3f}, mIoU {e.metrics.get('miou', float('nan')):.3f}, "
                  f"mean class Dice {e.metrics.get('mean_dice', float('nan')):.3f}, "
                  f"bPQ {e.metrics.get('bpq', float('nan')):.3f}") if e.metrics else ""
        stopping = f" {STOPPING}" if self._job is not None and self._job.stop_requested else ""
        self.status.value = (f"Epoch {e.epoch}/{e.epochs}: training loss {e.train_loss:.3f}{scores}"
                             f"{' (best so far, saved)' if e.best else ''} in {e.seconds:.1f} s.{stopping}"
                             f"{self._finishing(e)}")

    def _finishing(self, e: EpochDone) -> str:
        """What the run does after its last epoch: a fine-tune re-tunes its start model's nucleus
        threshold on the validation images (seconds to a minute), which had looked like a hang."""
        job = self._job
        if job is None or job.stop_requested or (e.epoch < e.epochs and not e.stop_reason):
            return ""
        tunes = job.start_threshold is not None and bool(e.metrics) and job.cfg.tune_threshold in ("auto", True)
        return " Tuning the nucleus threshold on the validation images..." if tunes else " Finishing..."

    def _plot_epoch(self, e: EpochDone) -> None:
        self.plot.add("train_loss", e.epoch, e.train_loss)
        if e.metrics:
            self.plot.add("val_loss", e.epoch, e.val_loss)
            for line in ("miou", "mean_dice", "bpq"):
                self.plot.add(line, e.epoch, e.metrics.get(line))
        if e.best:
            self.plot.mark_best(e.epoch)
        if e.best and self._job is not None and self._job.preview:
            # a preview follows: drawn once its layer is in (matplotlib on the plot's thread and
            # napari's layer set-up on this one would take turns at the interpreter lock)
            self._plot_after_preview = True
        else:
            self.plot.draw()

    def _show_preview(self, p: Preview) -> None:
        """Show the prediction in two layers that later previews update: over the painted layer
        (its scale, translate, units and affine), or over the sample itself (folder data). A new layer goes in a
        step per event-loop turn, as the Segment widget's results do (in one turn: 160 ms here)."""
        from napari.layers import Labels

        name = "training preview"
        layers = [l for l in self.preview_layers if l in self._viewer.layers or l in self._going_in]
        source = self._job.layer_source if self._job is not None else None
        image_layer = None if source is not None else self._preview_image(layers, p.image, f"{name} image")
        # on the painted layer (µm, moved); a folder's sample beside the user's images, not over them
        extra = (dict(source.placement) if source is not None
                 else {"scale": (1.0, 1.0), "translate": tuple(image_layer.translate[-2:])})
        labels_layer = next((l for l in layers if layer_kind(l) == PREVIEW_KIND), None)
        if labels_layer is None or (labels_layer.data.shape != p.labels.shape and labels_layer not in self._going_in):
            if labels_layer is not None:
                self._viewer.layers.remove(labels_layer)
            kwargs = class_labels_kwargs(name, p.classes, p.colors, opacity=0.6, **extra)
            kwargs["metadata"][METADATA_KEY]["kind"] = PREVIEW_KIND
            labels_layer = Labels(p.labels, **kwargs)
        else:
            labels_layer.data = p.labels
            if extra:  # another run's, maybe of other layers
                place(labels_layer, extra)
        labels_layer.name = f"{name} (epoch {p.epoch}: {p.name})"
        self.preview_layers = [l for l in (image_layer, labels_layer) if l is not None]
        new = [l for l in self.preview_layers if l not in self._viewer.layers and l not in self._going_in]
        self._going_in += new

        def added():
            self._going_in = [l for l in self._going_in if l not in new]
            if self._plot_after_preview and self.plot is not None:
                from qtpy.QtCore import QTimer

                self._plot_after_preview = False
                QTimer.singleShot(0, self.plot.draw)  # after the new layer's first paint

        # a run in the caller's thread (tests, scripts) reads the layers as soon as it returns
        add_layers_in_turns(self._viewer, new, added, in_turns=self._worker is not None, owner=self.native)

    def _preview_image(self, layers: list, image: np.ndarray, name: str):
        from napari.layers import Image

        layer = next((l for l in layers if layer_kind(l) == PREVIEW_IMAGE_KIND), None)
        if layer is None:
            return Image(image, name=name, rgb=image.shape[-1] == 3, translate=self._beside_the_images(),
                         metadata={METADATA_KEY: {"kind": PREVIEW_IMAGE_KIND}})
        layer.data = image
        return layer

    def _beside_the_images(self) -> tuple[float, float]:
        """Where a folder sample's preview goes: right of the viewer's other layers, a 5 % gap
        between (at the origin it had covered the user's own image, without a word)."""
        extents = [np.asarray(l.extent.world, float)[:, -2:] for l in self._viewer.layers
                   if layer_kind(l) not in (PREVIEW_KIND, PREVIEW_IMAGE_KIND)]
        if not extents:
            return (0.0, 0.0)
        low = min(e[0, 0] for e in extents), min(e[0, 1] for e in extents)
        high = max(e[1, 0] for e in extents), max(e[1, 1] for e in extents)
        return (float(low[0]), float(high[1] + 0.05 * (high[1] - low[1]) + 1))

    def _on_failed(self, failed: TrainingFailed) -> None:
        self._job = None
        self._set_running(False)
        self._fail(_in_widget_words(failed.message) if failed.error is None else failed.error,
                   prefix="Training failed: ")
        if failed.checkpoint is not None:  # epochs before the failure saved a best checkpoint: usable
            self.trained_name = trained_models.add(failed.checkpoint, Path(failed.checkpoint).parent.name)
            self.status.value += f" Its best checkpoint is listed as '{self.trained_name}' in the Segment widget."

    def _on_done(self, done: TrainingDone) -> None:
        self._job = None
        self._set_running(False)
        self.result = done
        self._plot_after_preview = False
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
