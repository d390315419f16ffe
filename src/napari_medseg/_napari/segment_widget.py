"""Segment widget: pick an image layer and a model, segment off the GUI thread (the model loads
there too), get a class map and its nuclei (outlined over the class colours), then re-threshold
them without running the network again."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, ProgressBar, PushButton,
                              SpinBox)

from ..devices import available_devices
from ..errors import MedsegError
from ..inference.postprocess import PostprocessSettings
from ..inference.rethreshold import KeptRun, Thresholds, iter_segment_keeping
from ..inference.segmenter import Segmenter
from ..inference.settings import BLENDS, TileSettings
from ..nuclei.measure import nucleus_count
from ..nuclei.votes import instance_classes
from ..nuclei.watershed import INSTANCE_MAX_PIXELS, InstanceSettings
from ..steps import run_steps
from .common import WidgetInputError, report_error, start_worker
from .layers import (class_labels_kwargs, image_layers, instance_labels_kwargs, legend_html, placement,
                     wrapping_label)
from .model_list import DEFAULT_MODEL, FILE_MODEL, follow_trained_models, trained_models
from .torch_import import import_torch_dynamo

if TYPE_CHECKING:
    import napari

RETHRESHOLD_DEBOUNCE_MS = 150
NUCLEUS_OUTLINE_PX = 2


class SegmentWidget(Container):
    """Runs the segmenter in a napari thread worker; Cancel stops within one batch. The last run's
    probabilities and distance map are kept (``KeptRun``): the threshold controls remake the
    result from them."""

    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._worker = self._rethreshold_worker = self._timer = None
        self._segmenter_cache: tuple[tuple, Segmenter] | None = None
        self._model_threshold: float | None = None
        self.kept: KeptRun | None = None
        self.last_layer = self.last_instances_layer = None
        self.advanced = Container(widgets=self._setting_controls(), labels=True)
        self.extend([*self._input_controls(), *self._threshold_controls(), self.show_advanced, self.advanced,
                     *self._action_controls()])
        self._connect()
        self.reset_choices()

    def _input_controls(self) -> list:
        self.image_layer = ComboBox(label="image", choices=lambda _w=None: image_layers(self._viewer))
        self.model_source = ComboBox(label="model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")
        self.nuclei = CheckBox(text="nucleus instances (outlined)", value=True,
                               tooltip="Seeded by the model's distance map where it has one.")
        return [self.image_layer, self.model_source, self.checkpoint, self.device, self.nuclei]

    def _threshold_controls(self) -> list:
        """What re-thresholding changes: these update the last result without the network."""
        instances = InstanceSettings()
        # 0 = the model's own (tuned by medseg tune-threshold; argmax if it has none)
        self.threshold = FloatSpinBox(label="nucleus threshold", value=0.0, min=0.0, max=0.99, step=0.01,
                                      tooltip="Foreground probability above which a pixel is nucleus; "
                                              "0 = the model's own (argmax if it has none).")
        self.marker_threshold = FloatSpinBox(label="marker threshold", value=instances.marker_threshold, min=0.01,
                                             max=0.99, step=0.05,
                                             tooltip="Distance-map level of a nucleus core (one seed each); "
                                                     "lower merges touching nuclei less often.")
        self.min_nucleus = SpinBox(label="min nucleus (px)", value=instances.min_size, min=0, max=100_000,
                                   tooltip="Nuclei smaller than this are dropped as noise.")
        self.show_advanced = CheckBox(text="advanced settings (tiles, clean-up)", value=False)
        return [self.threshold, self.marker_threshold, self.min_nucleus]

    def _setting_controls(self) -> list:
        """Tiling and clean-up controls, starting at the core's defaults (folded away at first)."""
        tiles, cleanup = TileSettings(), PostprocessSettings()
        self.tile_size = SpinBox(label="tile size", value=tiles.tile_size, min=32, max=4096, step=32)
        self.overlap = SpinBox(label="overlap", value=tiles.overlap, min=0, max=2048, step=16)
        self.batch_size = SpinBox(label="batch size", value=tiles.batch_size, min=1, max=256)
        self.blend = ComboBox(label="blend", choices=list(BLENDS), value=tiles.blend)
        self.tta = CheckBox(text="flip test-time augmentation (4x slower)", value=tiles.tta)
        self.skip_background = CheckBox(text="skip near-white glass tiles (H&&E)", value=tiles.skip_background)
        self.min_object_size = SpinBox(label="min object (px)", value=cleanup.min_object_size, min=0, max=100_000)
        self.fill_holes = SpinBox(label="fill holes up to (px)", value=cleanup.max_hole_size, min=0, max=100_000)
        return [self.tile_size, self.overlap, self.batch_size, self.blend, self.tta, self.skip_background,
                self.min_object_size, self.fill_holes]

    def _action_controls(self) -> list:
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)  # tiles, then nuclei steps
        self.status = wrapping_label(value="")
        self.legend = wrapping_label(value="")
        return [self.run_button, self.cancel_button, self.progress, self.status, self.legend]

    def _connect(self) -> None:
        self.advanced.visible = False
        self.show_advanced.changed.connect(lambda v: setattr(self.advanced, "visible", v))
        self.model_source.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == FILE_MODEL))
        follow_trained_models(self.model_source)  # models from the Train widget
        self.run_button.changed.connect(lambda: self.run())
        self.cancel_button.changed.connect(self.cancel)
        for control in (self.threshold, self.marker_threshold, self.min_nucleus):
            control.changed.connect(self._schedule_rethreshold)
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)

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

    def _segmenter(self, key: tuple) -> Segmenter:
        """The model for ``key`` = (model, device), loaded once (in the worker: it takes seconds)."""
        if self._segmenter_cache is None or self._segmenter_cache[0] != key:
            import_torch_dynamo()  # building the network imports torchvision: see torch_import
            self._segmenter_cache = (key, Segmenter.load(key[0], device=key[1]))
        return self._segmenter_cache[1]

    def tile_settings(self) -> TileSettings:
        return TileSettings(self.tile_size.value, self.overlap.value, self.batch_size.value, blend=self.blend.value,
                            tta=self.tta.value, skip_background=self.skip_background.value)

    def thresholds(self) -> Thresholds:
        """The controls' thresholds for re-thresholding; a nucleus threshold of 0 is the last run's model's."""
        return Thresholds(self.threshold.value or self._model_threshold, self.marker_threshold.value,
                          self.min_nucleus.value)

    def _fail(self, error: BaseException | str) -> None:
        self._set_running(False)
        report_error(self.status, error)

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    # -- actions -----------------------------------------------------------------
    def _prepare(self):
        """A step generator for the chosen image and settings (it loads the model first), and the
        image layer; raises a ``MedsegError`` on a bad file, setting or image."""
        layer = self.image_layer.value
        if layer is None:
            raise WidgetInputError("Choose an image layer to segment.")
        key = (self._model_ref(), self.device.value)
        # full resolution of a pyramid; lazy (dask/zarr) data stays lazy: the engine reads strips
        image = layer.data[0] if layer.multiscale else layer.data
        if layer.rgb is False and image.ndim == 3 and image.shape[-1] not in (3, 4):
            raise WidgetInputError(
                f"'{layer.name}' is a stack of shape {tuple(image.shape)}; segmenting stacks is not supported, "
                "open a single 2-D image (or one plane of the stack as its own layer)."
            )
        cleanup = PostprocessSettings(self.min_object_size.value, self.fill_holes.value)
        tiles, nuclei = self.tile_settings(), self.nuclei.value
        chosen = (self.threshold.value, self.marker_threshold.value, self.min_nucleus.value)

        def job():  # in the worker: widgets are read above, on the GUI thread
            segmenter = self._segmenter(key)
            settings = tiles.checked(segmenter.meta.model.output_stride)
            thresholds = Thresholds(chosen[0] or segmenter.meta.foreground_threshold, *chosen[1:])
            segmenter.foreground_threshold = thresholds.nucleus
            instance_settings = InstanceSettings(marker_threshold=thresholds.marker, min_size=thresholds.min_size)
            result = yield from iter_segment_keeping(segmenter, image, settings, cleanup, instance_settings, nuclei)
            return (*result, segmenter, layer)

        return job

    def run(self, threaded: bool = True):
        """Segment the chosen image. ``threaded=False`` runs in the caller's thread (tests, scripts)
        and returns the class-map layer; otherwise returns the started worker."""
        try:
            job = self._prepare()
        except MedsegError as exc:  # bad model/file/settings/image: report, add nothing
            return self._fail(exc)
        self.status.value = f"Loading the model, then segmenting '{self.image_layer.value.name}'..."
        self.progress.max, self.progress.value = 0, 0  # busy until the first tile reports
        self._set_running(True)
        if not threaded:
            return self._run_here(job())
        self._worker = start_worker(job, on_error=self._on_error, yielded=self._on_progress, returned=self._on_done,
                                    aborted=self._on_cancelled, finished=lambda: setattr(self, "_worker", None))
        return self._worker

    def _run_here(self, steps):
        try:
            result = run_steps(steps, lambda done, total: self._on_progress((done, total)))
        except MedsegError as exc:
            return self._fail(exc)
        except BaseException:  # a bug: the caller gets its traceback, the buttons work again
            self._set_running(False)
            raise
        return self._on_done(result)

    def cancel(self) -> None:
        if self._worker is not None:
            self.status.value = "Cancelling..."
            # takes effect at the next yield: after the current batch, or the current watershed step
            self._worker.quit()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        if self.progress.max != total:
            self.progress.max = total
            self.status.value = f"Segmenting '{self.image_layer.value.name}'..." if self.image_layer.value else ""
        self.progress.value = done

    def _on_error(self, exc: BaseException) -> None:
        self._fail(exc)
        if self._segmenter_cache is not None and self._segmenter_cache[1].device.type != "cpu":
            self._segmenter_cache[1].release()

    def _on_cancelled(self) -> None:
        self._set_running(False)
        self.progress.max = max(self.progress.max, 1)
        self.status.value = "Cancelled; nothing was added."
        if self._segmenter_cache is not None:
            self._segmenter_cache[1].release()
            self._segmenter_cache = None

    def _on_done(self, result):
        """``result``: (class map, instances or None, KeptRun or None, segmenter, image layer)."""
        labels, instances, kept, segmenter, image_layer = result
        self.kept, self._classes, self._colors = kept, segmenter.classes, segmenter.meta.colors
        self._model_threshold = segmenter.meta.foreground_threshold
        self._report = segmenter.last_report
        name = f"{image_layer.name} segmentation"
        self.last_layer = self._viewer.add_labels(labels, **class_labels_kwargs(
            name, self._classes, self._colors, **placement(image_layer)))
        self.last_instances_layer = None
        if instances is not None:
            self.last_instances_layer = self._viewer.add_labels(instances, **self._instance_kwargs(
                f"{image_layer.name} nuclei", labels, instances), **placement(image_layer))
            self.last_instances_layer.contour = NUCLEUS_OUTLINE_PX
        self.status.value = self._summary(labels, instances, segmenter.foreground_threshold)
        self.legend.value = legend_html(self._classes, self._colors)
        self._set_running(False)
        if segmenter.device.type != "cpu":
            segmenter.release()  # give the GPU memory back between runs
        return self.last_layer

    def _instance_kwargs(self, name: str, labels: np.ndarray, instances: np.ndarray) -> dict:
        return instance_labels_kwargs(name, self._classes, self._colors, instance_classes(instances, labels))

    # -- re-thresholding ---------------------------------------------------------
    def _schedule_rethreshold(self, *_):
        """Debounced: a spin box held down re-thresholds once it settles."""
        if self.kept is None or self.last_layer is None:
            return
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(lambda: self.rethreshold())
        self._timer.start(RETHRESHOLD_DEBOUNCE_MS)

    def rethreshold(self, threaded: bool = True):
        """Remake the last result from its kept probabilities for the current thresholds, in place
        (the layers keep their names, colours and places). Returns the worker, or with
        ``threaded=False`` the ``(class map, instances)``."""
        if self.kept is None or self.last_layer is None:
            return None
        thresholds, nuclei = self.thresholds(), self.last_instances_layer is not None
        if not threaded:
            return self._show_rethresholded((*self.kept.result(thresholds, nuclei), thresholds))
        if self._rethreshold_worker is not None:
            self._rethreshold_worker.quit()

        def job():
            labels, instances = yield from self.kept.iter_result(thresholds, nuclei)
            return labels, instances, thresholds

        self._rethreshold_worker = start_worker(job, on_error=self._fail, returned=self._show_rethresholded)
        return self._rethreshold_worker

    def _show_rethresholded(self, result):
        labels, instances, thresholds = result
        if self.last_layer is None or self.last_layer not in self._viewer.layers:
            return None
        self.last_layer.data = labels
        if instances is not None and self.last_instances_layer in self._viewer.layers:
            meta = self._instance_kwargs(self.last_instances_layer.name, labels, instances)["metadata"]
            self.last_instances_layer.metadata = meta
            self.last_instances_layer.data = instances
        self.status.value = self._summary(labels, instances, thresholds.nucleus)
        return labels, instances

    def _summary(self, labels: np.ndarray, instances: np.ndarray | None, threshold: float | None) -> str:
        """What the run found: the nuclei, each class's share of the image, the threshold used."""
        counts = np.bincount(labels.ravel(), minlength=len(self._classes))
        covered = ", ".join(f"{c} {100 * n / labels.size:.1f}%" for c, n in zip(self._classes[1:], counts[1:]))
        parts = [f"{nucleus_count(instances)} nuclei"] if instances is not None else []
        if instances is None and self.nuclei.value:
            parts.append(f"no nuclei layer above {INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx")
        parts.append(covered)
        if threshold is not None:
            parts.append(f"nucleus threshold {threshold:.2f}")
        if self._report.skipped_background:
            parts.append(f"{self._report.skipped_background}/{self._report.tiles} glass tiles skipped")
        parts += self._report.notes
        return "Done: " + "; ".join(parts)
