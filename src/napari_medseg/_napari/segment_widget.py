"""Segment widget: pick an image layer and a model, segment off the GUI thread, get a Labels layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton,
                              SpinBox)

from ..devices import available_devices
from ..inference.segmenter import PostprocessSettings, Segmenter, TileSettings
from ..nuclei.watershed import INSTANCE_MAX_PIXELS
from ..nuclei.votes import instance_classes
from .layers import class_labels_kwargs, instance_labels_kwargs
from .model_list import trained_models

if TYPE_CHECKING:
    import napari

DEFAULT_MODEL = "default (shipped)"
FILE_MODEL = "checkpoint file..."


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


class SegmentWidget(Container):
    """Runs ``Segmenter.iter_segment`` in a napari thread worker; Cancel stops within one batch."""

    def __init__(self, viewer: "napari.viewer.Viewer"):
        super().__init__()
        self._viewer = viewer
        self._worker = None
        self._segmenter_cache: tuple[tuple, Segmenter] | None = None
        self.image_layer = ComboBox(label="image", choices=self._image_layers)
        self.model_source = ComboBox(label="model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")
        self.tile_size = SpinBox(label="tile size", value=256, min=32, max=4096, step=32)
        self.overlap = SpinBox(label="overlap", value=64, min=0, max=2048, step=16)
        self.batch_size = SpinBox(label="batch size", value=4, min=1, max=256)
        self.blend = ComboBox(label="blend", choices=["gaussian", "cosine"], value="gaussian")
        self.tta = CheckBox(text="flip test-time augmentation (4x slower)", value=False)
        self.skip_background = CheckBox(text="skip near-white glass tiles (H&E)", value=True)
        self.min_object_size = SpinBox(label="min object (px)", value=0, min=0, max=100_000)
        self.fill_holes = SpinBox(label="fill holes up to (px)", value=0, min=0, max=100_000)
        # 0 = the model's own (tuned by medseg tune-threshold; argmax if it has none)
        self.threshold = FloatSpinBox(label="nucleus threshold (0 = model's)", value=0.0, min=0.0, max=0.99, step=0.01)
        self.nuclei = CheckBox(text="add nucleus instances (seeded by the model's distance map if it has one)",
                               value=True)
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)  # tiles, then nuclei steps
        self.status = Label(value="")
        self.extend([self.image_layer, self.model_source, self.checkpoint, self.device, self.tile_size,
                     self.overlap, self.batch_size, self.blend, self.tta, self.skip_background,
                     self.min_object_size, self.fill_holes, self.threshold, self.nuclei, self.run_button,
                     self.cancel_button, self.progress, self.status])
        self.model_source.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == FILE_MODEL))
        trained_models.changed.connect(self.model_source.reset_choices)  # models from the Train widget
        self.run_button.changed.connect(lambda: self.run())
        self.cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        self.reset_choices()
        self.last_layer = self.last_instances_layer = None

    def _image_layers(self, _widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    # -- helpers -----------------------------------------------------------------
    def _model_choices(self, _widget=None) -> list:
        return [DEFAULT_MODEL, *trained_models.names(), FILE_MODEL]

    def _model_ref(self) -> str:
        if self.model_source.value == DEFAULT_MODEL:
            return "default"
        if self.model_source.value in trained_models:
            return str(trained_models.path(self.model_source.value))
        path = Path(str(self.checkpoint.value))
        if not path.is_file():
            raise ValueError(f"Choose an existing .safetensors checkpoint (got '{path}').")
        return str(path)

    def _segmenter(self) -> Segmenter:
        key = (self._model_ref(), self.device.value)
        if self._segmenter_cache is None or self._segmenter_cache[0] != key:
            self._segmenter_cache = (key, Segmenter.load(key[0], device=key[1]))
        return self._segmenter_cache[1]

    def _fail(self, message: str) -> None:
        self.status.value = f"Error: {message}"
        self._set_running(False)
        _notify_error(message)

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    # -- actions -----------------------------------------------------------------
    def run(self, threaded: bool = True):
        """Segment the chosen image. ``threaded=False`` runs in the caller's thread (tests, scripts)."""
        layer = self.image_layer.value
        if layer is None:
            self._fail("Choose an image layer to segment.")
            return None
        try:
            segmenter = self._segmenter()
            settings = self.tile_settings().checked(segmenter.meta.model.output_stride)
            # full resolution of a pyramid; lazy (dask/zarr) data stays lazy: the engine reads strips
            image = layer.data[0] if layer.multiscale else layer.data
            if layer.rgb is False and image.ndim == 3 and image.shape[-1] not in (3, 4):
                raise ValueError(
                    f"'{layer.name}' is a stack of shape {tuple(image.shape)}; segmenting stacks is not supported, "
                    "open a single 2-D image (or one plane of the stack as its own layer)."
                )
            cleanup = PostprocessSettings(self.min_object_size.value, self.fill_holes.value)
            segmenter.foreground_threshold = self.threshold.value or segmenter.meta.foreground_threshold
            if self.nuclei.value:
                steps = segmenter.iter_segment_nuclei(image, settings, postprocess=cleanup)
            else:
                steps = segmenter.iter_segment(image, settings, postprocess=cleanup)
        except Exception as exc:  # bad model/file/settings/image: report, add nothing
            self._fail(str(exc))
            return None
        self.status.value = f"Segmenting '{layer.name}'..."
        self.progress.value = 0
        self._set_running(True)
        name = f"{layer.name} segmentation"
        if not threaded:
            try:
                while True:
                    try:
                        self._on_progress(next(steps))
                    except StopIteration as stop:
                        return self._on_done((stop.value, segmenter, name))
            except Exception as exc:
                self._fail(str(exc))
                return None

        from napari.qt.threading import thread_worker

        @thread_worker
        def job():
            labels = yield from steps
            return labels, segmenter, name

        worker = job()
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_cancelled)
        worker.finished.connect(lambda: setattr(self, "_worker", None))
        self._worker = worker
        worker.start()
        return worker

    def tile_settings(self) -> TileSettings:
        return TileSettings(self.tile_size.value, self.overlap.value, self.batch_size.value, blend=self.blend.value,
                            tta=self.tta.value, skip_background=self.skip_background.value)

    def cancel(self) -> None:
        if self._worker is not None:
            self.status.value = "Cancelling..."
            # takes effect at the next yield: after the current batch, or the current watershed step
            self._worker.quit()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        self.progress.max = total
        self.progress.value = done

    def _on_error(self, exc: Exception) -> None:
        self._fail(str(exc))
        if self._segmenter_cache is not None and self._segmenter_cache[1].device.type != "cpu":
            self._segmenter_cache[1].release()

    def _on_cancelled(self) -> None:
        self._set_running(False)
        self.status.value = "Cancelled; nothing was added."
        if self._segmenter_cache is not None:
            self._segmenter_cache[1].release()
            self._segmenter_cache = None

    def _on_done(self, result):
        """``result``: (class map or (class map, instances), segmenter, layer name)."""
        labels, segmenter, name = result
        labels, instances = labels if isinstance(labels, tuple) else (labels, None)  # iter_segment_nuclei's pair
        kwargs = class_labels_kwargs(name, segmenter.classes, segmenter.meta.colors)
        self.last_layer = self._viewer.add_labels(labels, **kwargs)
        self.last_instances_layer = None
        if instances is not None:
            self.last_instances_layer = self._viewer.add_labels(instances, **instance_labels_kwargs(
                name.replace(" segmentation", " nuclei"), segmenter.classes, segmenter.meta.colors,
                instance_classes(instances, labels)))
        counts = np.bincount(labels.ravel(), minlength=len(segmenter.classes))
        covered = ", ".join(f"{c} {100 * n / labels.size:.1f}%" for c, n in zip(segmenter.classes[1:], counts[1:]))
        report = segmenter.last_report
        skipped = f"; {report.skipped_background}/{report.tiles} glass tiles skipped" if report.skipped_background else ""
        nuclei = "" if instances is None else f"; {int(instances.max())} nuclei"
        if instances is None and self.nuclei.value:
            nuclei = f"; no nuclei layer above {INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx"
        threshold = "" if segmenter.foreground_threshold is None else f"; nucleus threshold {segmenter.foreground_threshold:.2f}"
        self.status.value = (f"Done: {covered}{nuclei}{threshold}{skipped}"
                             + (f" ({'; '.join(report.notes)})" if report.notes else ""))
        self._set_running(False)
        if segmenter.device.type != "cpu":
            segmenter.release()  # give the GPU memory back between runs
        return self.last_layer
