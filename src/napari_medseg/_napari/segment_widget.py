"""Segment widget: pick an image layer and a model, segment off the GUI thread, get a Labels layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton,
                              SpinBox)

from ..devices import available_devices
from ..errors import MedsegError
from ..inference.postprocess import PostprocessSettings
from ..inference.segmenter import Segmenter
from ..inference.settings import BLENDS, TileSettings
from ..nuclei.votes import instance_classes
from ..nuclei.watershed import INSTANCE_MAX_PIXELS
from ..steps import run_steps
from .common import WidgetInputError, report_error, start_worker
from .layers import class_labels_kwargs, image_layers, instance_labels_kwargs
from .model_list import DEFAULT_MODEL, FILE_MODEL, trained_models
from .torch_import import import_torch_dynamo

if TYPE_CHECKING:
    import napari


class SegmentWidget(Container):
    """Runs ``Segmenter.iter_segment`` in a napari thread worker; Cancel stops within one batch."""

    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._worker = None
        self._segmenter_cache: tuple[tuple, Segmenter] | None = None
        self.last_layer = self.last_instances_layer = None
        self.extend([*self._input_controls(), *self._setting_controls(), *self._action_controls()])
        self.model_source.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == FILE_MODEL))
        trained_models.changed.connect(self.model_source.reset_choices)  # models from the Train widget
        self.run_button.changed.connect(lambda: self.run())
        self.cancel_button.changed.connect(self.cancel)
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        self.reset_choices()

    def _input_controls(self) -> list:
        self.image_layer = ComboBox(label="image", choices=lambda _w=None: image_layers(self._viewer))
        self.model_source = ComboBox(label="model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")
        return [self.image_layer, self.model_source, self.checkpoint, self.device]

    def _setting_controls(self) -> list:
        """Tiling and clean-up controls, starting at the core's defaults."""
        tiles, cleanup = TileSettings(), PostprocessSettings()
        self.tile_size = SpinBox(label="tile size", value=tiles.tile_size, min=32, max=4096, step=32)
        self.overlap = SpinBox(label="overlap", value=tiles.overlap, min=0, max=2048, step=16)
        self.batch_size = SpinBox(label="batch size", value=tiles.batch_size, min=1, max=256)
        self.blend = ComboBox(label="blend", choices=list(BLENDS), value=tiles.blend)
        self.tta = CheckBox(text="flip test-time augmentation (4x slower)", value=tiles.tta)
        self.skip_background = CheckBox(text="skip near-white glass tiles (H&E)", value=tiles.skip_background)
        self.min_object_size = SpinBox(label="min object (px)", value=cleanup.min_object_size, min=0, max=100_000)
        self.fill_holes = SpinBox(label="fill holes up to (px)", value=cleanup.max_hole_size, min=0, max=100_000)
        # 0 = the model's own (tuned by medseg tune-threshold; argmax if it has none)
        self.threshold = FloatSpinBox(label="nucleus threshold (0 = model's)", value=0.0, min=0.0, max=0.99, step=0.01)
        self.nuclei = CheckBox(text="add nucleus instances (seeded by the model's distance map if it has one)",
                               value=True)
        return [self.tile_size, self.overlap, self.batch_size, self.blend, self.tta, self.skip_background,
                self.min_object_size, self.fill_holes, self.threshold, self.nuclei]

    def _action_controls(self) -> list:
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)  # tiles, then nuclei steps
        self.status = Label(value="")
        return [self.run_button, self.cancel_button, self.progress, self.status]

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
            raise WidgetInputError(f"Choose an existing .safetensors checkpoint (got '{path}').")
        return str(path)

    def _segmenter(self) -> Segmenter:
        key = (self._model_ref(), self.device.value)
        if self._segmenter_cache is None or self._segmenter_cache[0] != key:
            import_torch_dynamo()  # building the network imports torchvision: see torch_import
            self._segmenter_cache = (key, Segmenter.load(key[0], device=key[1]))
        return self._segmenter_cache[1]

    def tile_settings(self) -> TileSettings:
        return TileSettings(self.tile_size.value, self.overlap.value, self.batch_size.value, blend=self.blend.value,
                            tta=self.tta.value, skip_background=self.skip_background.value)

    def _fail(self, error: BaseException | str) -> None:
        self._set_running(False)
        report_error(self.status, error)

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    # -- actions -----------------------------------------------------------------
    def _prepare(self):
        """(step generator, segmenter, result layer name) for the chosen image and settings;
        raises a ``MedsegError`` on a bad model, file, setting or image."""
        layer = self.image_layer.value
        if layer is None:
            raise WidgetInputError("Choose an image layer to segment.")
        segmenter = self._segmenter()
        settings = self.tile_settings().checked(segmenter.meta.model.output_stride)
        # full resolution of a pyramid; lazy (dask/zarr) data stays lazy: the engine reads strips
        image = layer.data[0] if layer.multiscale else layer.data
        if layer.rgb is False and image.ndim == 3 and image.shape[-1] not in (3, 4):
            raise WidgetInputError(
                f"'{layer.name}' is a stack of shape {tuple(image.shape)}; segmenting stacks is not supported, "
                "open a single 2-D image (or one plane of the stack as its own layer)."
            )
        cleanup = PostprocessSettings(self.min_object_size.value, self.fill_holes.value)
        segmenter.foreground_threshold = self.threshold.value or segmenter.meta.foreground_threshold
        segment = segmenter.iter_segment_nuclei if self.nuclei.value else segmenter.iter_segment
        return segment(image, settings, postprocess=cleanup), segmenter, f"{layer.name} segmentation"

    def run(self, threaded: bool = True):
        """Segment the chosen image. ``threaded=False`` runs in the caller's thread (tests, scripts)
        and returns the class-map layer; otherwise returns the started worker."""
        try:
            steps, segmenter, name = self._prepare()
        except MedsegError as exc:  # bad model/file/settings/image: report, add nothing
            return self._fail(exc)
        self.status.value = f"Segmenting '{self.image_layer.value.name}'..."
        self.progress.value = 0
        self._set_running(True)
        if not threaded:
            return self._run_here(steps, segmenter, name)

        def job():
            labels = yield from steps
            return labels, segmenter, name

        self._worker = start_worker(job, on_error=self._on_error, yielded=self._on_progress, returned=self._on_done,
                                    aborted=self._on_cancelled, finished=lambda: setattr(self, "_worker", None))
        return self._worker

    def _run_here(self, steps, segmenter: Segmenter, name: str):
        try:
            labels = run_steps(steps, lambda done, total: self._on_progress((done, total)))
        except MedsegError as exc:
            return self._fail(exc)
        except BaseException:  # a bug: the caller gets its traceback, the buttons work again
            self._set_running(False)
            raise
        return self._on_done((labels, segmenter, name))

    def cancel(self) -> None:
        if self._worker is not None:
            self.status.value = "Cancelling..."
            # takes effect at the next yield: after the current batch, or the current watershed step
            self._worker.quit()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        self.progress.max = total
        self.progress.value = done

    def _on_error(self, exc: BaseException) -> None:
        self._fail(exc)
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
        self.last_layer = self._viewer.add_labels(labels, **class_labels_kwargs(name, segmenter.classes,
                                                                                segmenter.meta.colors))
        self.last_instances_layer = None
        if instances is not None:
            self.last_instances_layer = self._viewer.add_labels(instances, **instance_labels_kwargs(
                name.replace(" segmentation", " nuclei"), segmenter.classes, segmenter.meta.colors,
                instance_classes(instances, labels)))
        self.status.value = self._summary(labels, instances, segmenter)
        self._set_running(False)
        if segmenter.device.type != "cpu":
            segmenter.release()  # give the GPU memory back between runs
        return self.last_layer

    def _summary(self, labels: np.ndarray, instances: np.ndarray | None, segmenter: Segmenter) -> str:
        """What the run found: each class's share of the image, the nuclei, the threshold used."""
        counts = np.bincount(labels.ravel(), minlength=len(segmenter.classes))
        covered = ", ".join(f"{c} {100 * n / labels.size:.1f}%" for c, n in zip(segmenter.classes[1:], counts[1:]))
        report = segmenter.last_report
        skipped = (f"; {report.skipped_background}/{report.tiles} glass tiles skipped"
                   if report.skipped_background else "")
        nuclei = "" if instances is None else f"; {int(instances.max())} nuclei"
        if instances is None and self.nuclei.value:
            nuclei = f"; no nuclei layer above {INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx"
        threshold = ("" if segmenter.foreground_threshold is None
                     else f"; nucleus threshold {segmenter.foreground_threshold:.2f}")
        notes = f" ({'; '.join(report.notes)})" if report.notes else ""
        return f"Done: {covered}{nuclei}{threshold}{skipped}{notes}"
