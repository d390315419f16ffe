"""Segment widget: pick an image layer and a model, segment off the GUI thread (the model loads
there too), get a class map and its nuclei (outlined over the class colours), then re-threshold
them without running the network again.

What to segment: the whole image (in memory), the field of view or a rectangle / polygon drawn in
a Shapes layer (a crop of an image; of a slide, a region streamed to disk), or a whole slide. A
slide opened by the reader (``metadata['slide']``) runs ``inference.slide.iter_predict_slide`` in
a process of its own (``inference.slide_process``: the GUI never waits on its work); the results
land in a results folder and come back as multiscale Labels read lazily from zarr. What a run
becomes (its Labels layers, made in the worker, and its status line) is ``segment_results``.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, ProgressBar, PushButton,
                              SpinBox)

from ..errors import MedsegError
from ..inference.settings import BACKENDS
from ..inference.postprocess import PostprocessSettings
from ..inference.regions import Region
from ..inference.rethreshold import KEEP_MAX_PIXELS, KeptRun, Thresholds, apply_thresholds, iter_segment_keeping
from ..inference.settings import BLENDS, TileSettings
from ..inference.slide_process import SlideJob, SlideProcess, checkpoint_stamp
from ..io.images import file_stem
from ..io.lazy import LAZY_MIN_PIXELS
from ..io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM, is_plausible_pixel_size, unknown_pixel_size_note
from ..io.slide_outputs import check_no_slide_results, fresh_results_folder
from ..models import read_meta, resolve_model_path
from ..nuclei.watershed import INSTANCE_MAX_PIXELS, INSTANCE_STEPS, InstanceSettings
from ..steps import Cancelled, run_steps
from .common import (WidgetInputError, add_layers_in_turns, device_choices, follow_devices, report_error,
                     start_worker, step_from_own_value, warm_label_visuals)
from .dock import ScrollingDock
from .layers import (hidden_words, image_layers, images_over, labels_under, legend_html, pick_classes_from,
                     pixel_size_um, placement, plane_placement, replace_instances, shown_plane, wrapping_label)
from .model_list import DEFAULT_MODEL, FILE_MODEL, follow_trained_models, trained_models
from .segment_results import (ImageRun, SlideRun, as_layer, labels_layers, masked, nuclei_kwargs, on_grid, plane_said,
                              result_layer_kwargs, result_summary, slide_layer_args, slide_region_layer_args,
                              slide_summary, with_notes)
from .view_regions import drawn_shape, field_of_view, inside, region_placement, shapes_layers
from .torch_import import import_torch_dynamo

if TYPE_CHECKING:
    import napari

    from ..inference.segmenter import Segmenter  # imported with the first model, in the worker

RETHRESHOLD_DEBOUNCE_MS = 150
PROGRESS_INTERVAL_S = 0.2  # the bar moves at most this often (each move repaints the window)
# layout passes for a new status: one per level from the label up to the dock's form (3 here), and spare
LAYOUT_LEVELS = 8
WHOLE_IMAGE, FIELD_OF_VIEW, SHAPE, WHOLE_SLIDE = "whole image", "field of view", "drawn shape", "whole slide"
TARGETS = (WHOLE_IMAGE, FIELD_OF_VIEW, SHAPE, WHOLE_SLIDE)
RESULTS_HOME = Path("napari-medseg") / "results"  # under the home folder: a slide's own folder may be read-only


class SegmentWidget(ScrollingDock):
    """Runs the segmenter in a napari thread worker; Cancel stops within one batch. The last run's
    probabilities and distance map are kept (``KeptRun``): the threshold controls remake the
    result from them."""

    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        warm_label_visuals()  # off the GUI thread: the first result layer is added sooner
        super().__init__()
        self._viewer = napari_viewer
        self._worker = self._rethreshold_worker = self._timer = None
        self._edited = False  # the last result's layers were painted by the user
        self._segmenter_cache: tuple[tuple, Segmenter] | None = None
        self._runtime_noted = None  # the loaded model whose runtime notes the status has said
        self._cancel_requested = threading.Event()
        self._progress_shown = 0.0  # when the bar last moved (time.monotonic)
        # slide runs go to a child process that keeps the model loaded between runs
        self._slide_process = process = SlideProcess()
        self.native.destroyed.connect(lambda *_: process.close())  # the dock (or the viewer) closed
        self._mask: np.ndarray | None = None  # the last in-memory run's polygon, over its crop
        # the last run's model's own threshold and nucleus settings: what "model's" re-cuts that run with
        self._model_threshold: float | None = None
        self._model_instances = InstanceSettings()
        # the chosen model's own (threshold, nucleus settings): the boxes' "model's (0.40)" text and
        # where their arrows step from; None while the choice is no readable checkpoint
        self._chosen_values: tuple[float | None, InstanceSettings] | None = None
        self.kept: KeptRun | None = None
        self.last_layer = self.last_instances_layer = self.last_slide_result = None
        self._run_layer = None  # the image layer of the run under way (or the last one)
        self._run_image_removed = False  # it was deleted from the viewer while the run was under way
        self._nuclei_last = False  # the run's last INSTANCE_STEPS steps cut the nuclei (an image run's)
        self._summary = ""  # the last run's status line
        self._run_note = ""  # its note of the image it segmented (a stack's plane), kept by re-thresholds
        self.advanced = Container(widgets=self._setting_controls(), labels=True)
        self.extend([*self._input_controls(), *self._threshold_controls(), self.show_advanced, self.advanced,
                     *self._action_controls()])
        self.span_full_width(self.advanced, self.status, self.legend)
        self._connect()
        self.reset_choices()
        self._read_chosen_model()
        follow_devices(self.device, self.native)

    def _input_controls(self) -> list:
        self.image_layer = ComboBox(label="image", choices=lambda _w=None: image_layers(self._viewer))
        self.model_source = ComboBox(label="model", choices=self._model_choices, value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors", visible=False)
        self.device = ComboBox(label="device", choices=device_choices, value="auto",
                               tooltip="auto: a GPU where there is one, else the CPU.")
        self.nuclei = CheckBox(text="nucleus instances (outlined)", value=True,
                               tooltip="Seeded by the model's distance map where it has one.")
        # 0 = the image's own (its layer's scale or metadata, a slide's file): a PNG or JPEG records
        # none, and a 20x one taken as 40x is cut into fewer, larger nuclei (335 for 496)
        self.pixel_size = FloatSpinBox(label="pixel size (µm/px)", value=0.0, min=0.0, max=PLAUSIBLE_PIXEL_SIZE_UM[1],
                                       step=0.05, tooltip="The image's µm per pixel (0.25 at 40x, 0.5 at 20x): the "
                                       "model sees it at its own pixel size. Lowest = what the image records (a "
                                       "slide's file, the layer's scale); none recorded: taken as the model's.")
        self.pixel_size.native.setDecimals(3)
        self.pixel_size.native.setSpecialValueText(IMAGE_PIXEL_SIZE_TEXT)
        return [self.image_layer, *self._target_controls(), self.pixel_size, self.model_source, self.checkpoint,
                self.device, self.nuclei]

    def _target_controls(self) -> list:
        """What to segment, the Shapes layer of a drawn shape, and where a slide's results go."""
        self.target = ComboBox(label="segment", choices=TARGETS, value=WHOLE_IMAGE,
                               tooltip="The whole image (in memory: small images), what the canvas shows, the "
                                       "selected (else last) rectangle or polygon of a Shapes layer, or a whole "
                                       "slide opened by napari-medseg (streamed to disk, glass skipped).")
        self.shapes_layer = ComboBox(label="shapes", choices=lambda _w=None: shapes_layers(self._viewer),
                                     visible=False)
        self.results_folder = FileEdit(label="results folder", mode="d", visible=False,
                                       tooltip=f"Where a slide's results go (zarr, OME-TIFF, GeoJSON, CSV): a new "
                                               "folder <slide>, <slide>-2, ... in it each run, nothing overwritten; "
                                               f"empty: in ~/{RESULTS_HOME}.")
        return [self.target, self.shapes_layer, self.results_folder]

    def _threshold_controls(self) -> list:
        """What re-thresholding changes: these update the last result without the network.
        Each starts at the model's own value (its lowest value, shown as "model's")."""
        # 0 = the model's own (tuned by medseg tune-threshold; argmax if it has none)
        self.threshold = FloatSpinBox(label="nucleus threshold", value=0.0, min=0.0, max=0.99, step=0.01,
                                      tooltip="Foreground probability above which a pixel is nucleus; "
                                              "0 = the model's own (argmax if it has none).")
        self.threshold.native.setSpecialValueText(MODEL_THRESHOLD_TEXT)  # shown for 0: never a "0.00" threshold
        # 0 / -1 = the model's own (medseg tune-nuclei; InstanceSettings' defaults if it has none)
        self.marker_threshold = FloatSpinBox(label="marker threshold", value=0.0, min=0.0, max=0.99, step=0.05,
                                             tooltip="Distance-map level of a nucleus core (one seed each); "
                                                     "higher splits touching nuclei more often, too high loses "
                                                     "faint ones. Lowest = the model's own.")
        self.marker_threshold.native.setSpecialValueText(MODEL_THRESHOLD_TEXT)
        # a whole-number FloatSpinBox: magicgui's SpinBox (superqt's large-int box) shows no special text
        self.min_nucleus = FloatSpinBox(label="min nucleus (px)", value=MODEL_MIN_NUCLEUS, min=MODEL_MIN_NUCLEUS,
                                        max=100_000, step=1,
                                        tooltip="Nuclei smaller than this (model px) are dropped as noise; "
                                                "0 keeps all. Lowest = the model's own.")
        self.min_nucleus.native.setDecimals(0)
        self.min_nucleus.native.setSpecialValueText(MODEL_THRESHOLD_TEXT)
        self.show_advanced = CheckBox(text="advanced settings (tiles, clean-up, runtime)", value=False)
        # at "model's (0.40)" the arrows go to 0.35 / 0.45: the chosen model's values. Set before
        # the boxes go into the form: PyQt takes a Qt method not replaced by the time Qt first
        # calls it (the scrolling form sizes each box as it goes in) as never replaced
        for box, own in ((self.threshold, lambda values: values[0]),
                         (self.marker_threshold, lambda values: values[1].marker_threshold),
                         (self.min_nucleus, lambda values: float(values[1].min_size))):
            step_from_own_value(box, lambda own=own: None if self._chosen_values is None else own(self._chosen_values))
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
        self.backend = ComboBox(label="runtime", choices=list(BACKENDS), value="auto",
                                tooltip="Who runs the network on a CPU: auto = the fastest installed runtime "
                                        "(OpenVINO, ONNX Runtime) that agrees with PyTorch on a real tile, else "
                                        "PyTorch. The first run of a model exports it once (seconds); GPUs use "
                                        "PyTorch.")
        return [self.tile_size, self.overlap, self.batch_size, self.blend, self.tta, self.skip_background,
                self.min_object_size, self.fill_holes, self.backend]

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
        self.target.changed.connect(self._show_target_controls)
        self.target.changed.connect(self._offer_a_shapes_layer)
        self.image_layer.changed.connect(self._show_target_controls)
        follow_trained_models(self.model_source)  # models from the Train widget
        pick_classes_from(self.legend, lambda: self.last_layer, self._viewer)  # a click on a class paints it
        self.run_button.changed.connect(lambda: self.run())
        self.cancel_button.changed.connect(self.cancel)
        for control in (self.threshold, self.marker_threshold, self.min_nucleus):
            control.changed.connect(self._schedule_rethreshold)
        self.model_source.changed.connect(self._read_chosen_model)
        self.checkpoint.changed.connect(self._read_chosen_model)
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self._cancel_if_run_image_removed)

    def _show_target_controls(self, *_) -> None:
        self.shapes_layer.visible = self.target.value == SHAPE
        self.results_folder.visible = self._slide_info() is not None and self.target.value != WHOLE_IMAGE

    def _offer_a_shapes_layer(self, *_) -> None:
        """'drawn shape' chosen and nothing to draw in: a Shapes layer on the image's grid (its scale,
        units and place), selected, in rectangle mode. napari's own new Shapes layer is in pixels: over
        a slide in µm it warned 'Inconsistent units across layers' before the first shape was drawn."""
        image = self.image_layer.value
        if self.target.value != SHAPE or image is None or shapes_layers(self._viewer):
            return
        regions = self._viewer.add_shapes(name="regions", edge_color="yellow", face_color="transparent",
                                          **placement(image))
        self._viewer.layers.selection.active = regions
        regions.mode = "add_rectangle"
        self.shapes_layer.reset_choices()
        self.shapes_layer.value = regions
        self.status.value = ("Draw a rectangle in 'regions' (or a polygon, with napari's polygon tool), "
                             "then press Segment.")

    # -- helpers -----------------------------------------------------------------
    def _slide_info(self) -> dict | None:
        """The chosen layer's slide (path, pixel size, vendor), when the reader opened it as one."""
        layer = self.image_layer.value
        return getattr(layer, "metadata", {}).get("slide") if layer is not None else None

    def _results_folder(self, slide_path: str) -> Path:
        """A new folder for this run, named after the slide, in the chosen results folder (else in
        ``~/napari-medseg/results``): ``<slide>``, then ``<slide>-2``, ... A chosen folder had taken
        the files itself, and refused every next region of the slide until another was chosen."""
        text = str(self.results_folder.value or "").strip()
        base = Path.home() / RESULTS_HOME
        if text not in ("", "."):
            chosen = Path(text).expanduser()
            base = chosen if chosen.is_absolute() else Path.home() / chosen
        return fresh_results_folder(base, file_stem(Path(slide_path)))

    def _model_choices(self, _widget=None) -> list:
        return [DEFAULT_MODEL, *trained_models.names(), FILE_MODEL]

    def _model_ref(self) -> str:
        if self.model_source.value == DEFAULT_MODEL:
            return "default"
        if self.model_source.value in trained_models:
            return str(trained_models.path(self.model_source.value))
        if self.model_source.value != FILE_MODEL:  # a trained model listed before its file went
            raise WidgetInputError(f"'{self.model_source.value}' is no longer on disk (its checkpoint was moved or "
                                   "deleted); choose another model.")
        path = Path(str(self.checkpoint.value))
        if not path.is_file():
            raise WidgetInputError(f"Choose an existing .safetensors checkpoint (got '{path}').")
        return str(path)

    def _read_chosen_model(self, *_) -> None:
        """Show the chosen model's own values in the boxes ("model's (0.38)") as soon as it is
        chosen: read from its checkpoint's header (milliseconds, no weights loaded)."""
        try:
            meta = read_meta(resolve_model_path(self._model_ref()))
        except (MedsegError, OSError, ValueError):  # no file chosen yet, or not a checkpoint: said at Run
            self._show_model_values(None)
        else:
            self._show_model_values((meta.foreground_threshold, InstanceSettings.recorded(meta.instance_settings)))
            if self.status.value.startswith("Error:") and self._worker is None:
                # the error was the last Run's (often this very choice, now fixed): it no longer applies
                self.status.value = f"Model ready (classes: {', '.join(meta.classes[1:])}); Run segments with it."

    def _show_model_values(self, values: tuple[float | None, InstanceSettings] | None) -> None:
        """``(threshold, nucleus settings)`` of the chosen model into the boxes' "model's" text."""
        self._chosen_values = values
        texts = [MODEL_THRESHOLD_TEXT] * 3
        if values is not None:
            threshold, instances = values
            texts = [f"{MODEL_THRESHOLD_TEXT} ({'argmax' if threshold is None else f'{threshold:.2f}'})",
                     f"{MODEL_THRESHOLD_TEXT} ({instances.marker_threshold:.2f})",
                     f"{MODEL_THRESHOLD_TEXT} ({instances.min_size})"]
        for box, text in zip((self.threshold, self.marker_threshold, self.min_nucleus), texts):
            box.native.setSpecialValueText(text)

    def _iter_segmenter(self, key: tuple):
        """Generator (steps while it waits): the model for ``key`` = (model, device, runtime),
        loaded once, in the worker. By a runtime on the CPU it loads from this machine's record of
        the runtime's check (``runtime_record``), made first in a process of its own when there is
        none: napari's process then never imports torch (0.66 GB, and garbage-collection pauses
        of 0.1-0.2 s while it imports). PyTorch models load here (seconds; torch imported once)."""
        stamped = (*key, checkpoint_stamp(key[0]))  # a checkpoint rewritten since (training's best): load again
        if self._segmenter_cache is None or self._segmenter_cache[0] != stamped:
            from ..inference.runtime_record import iter_load_recorded
            from ..inference.segmenter import Segmenter

            model, device, backend = key
            segmenter = yield from iter_load_recorded(model, device, backend)
            if segmenter is None:
                import_torch_dynamo()  # building the network imports torchvision: see torch_import
                segmenter = Segmenter.load(model, device=device, backend=backend)
            self._segmenter_cache = (stamped, segmenter)
        return self._segmenter_cache[1]

    def tile_settings(self) -> TileSettings:
        return TileSettings(self.tile_size.value, self.overlap.value, self.batch_size.value, blend=self.blend.value,
                            tta=self.tta.value, skip_background=self.skip_background.value)

    def _chosen_instances(self) -> tuple[float | None, int | None]:
        """(marker threshold, min nucleus) as set; None where a box says "model's"."""
        min_nucleus = round(self.min_nucleus.value)
        return self.marker_threshold.value or None, None if min_nucleus == MODEL_MIN_NUCLEUS else min_nucleus

    def thresholds(self) -> Thresholds:
        """The controls' thresholds for re-thresholding; "model's" is the last run's model's value."""
        marker, min_size = self._chosen_instances()
        own = self._model_instances
        return Thresholds(self.threshold.value or self._model_threshold,
                          own.marker_threshold if marker is None else marker,
                          own.min_size if min_size is None else min_size)

    def _fail(self, error: BaseException | str) -> None:
        self._set_running(False)
        report_error(self.status, error)
        self._scroll_to_status()

    def _scroll_to_status(self) -> None:
        """Scroll the dock (short where Metrics and Train share the column) to what a run ended
        with: its status and legend, the status first where both do not fit. Qt lays the new
        text's wrapped height out a level per event-loop turn (label, its row, the form): those
        layout requests are handled first, and only they."""
        from qtpy.QtCore import QEvent
        from qtpy.QtWidgets import QApplication

        for _ in range(LAYOUT_LEVELS):
            QApplication.sendPostedEvents(None, QEvent.Type.LayoutRequest)
        for label in (self.legend, self.status):
            self.root_native_widget.ensureWidgetVisible(label.native, 0, 0)

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running

    # -- actions -----------------------------------------------------------------
    def _prepare(self):
        """A generator function for the chosen image, part and settings (it loads the model
        first); raises a ``MedsegError`` on a bad file, setting, image or region."""
        layer = self.image_layer.value
        if layer is None:
            raise WidgetInputError("Choose an image layer to segment.")
        key = (self._model_ref(), self.device.value, self.backend.value)
        image = layer.data[0] if layer.multiscale else layer.data  # lazy (dask/zarr) data stays lazy
        plane_ndim = 3 if layer.rgb else 2
        plane = None
        if image.ndim > plane_ndim and not (not layer.rgb and image.ndim == 3 and image.shape[-1] in (3, 4)):
            # a PanNuke fold or a time series: the plane the viewer shows (its sliders' position)
            if layer.multiscale or self.target.value == WHOLE_SLIDE:
                planes = int(np.prod(image.shape[:image.ndim - plane_ndim]))
                raise WidgetInputError(
                    f"'{layer.name}' is a stack of {planes} images (shape {tuple(image.shape)}) at several "
                    "resolutions; segmenting such a stack is not supported: open one plane of it as its own layer.")
            plane = shown_plane(self._viewer, layer, image.ndim - plane_ndim)
            image = image[plane]
        region, polygon = self._part(layer)
        slide = self._slide_info()
        if region is not None:
            region = region.checked(tuple(image.shape[:2]), "slide" if slide is not None else "image")
        if self.target.value == WHOLE_SLIDE and slide is None:
            raise WidgetInputError(_not_a_slide(layer))
        if slide is not None and self.target.value != WHOLE_IMAGE:
            return self._slide_job(key, layer, slide, region, polygon)
        return self._image_job(key, layer, image, region, polygon, plane)

    def _given_pixel_size(self) -> float | None:
        """The pixel size typed in the form (µm/px), or None for the image's own; one no microscope
        gives is refused."""
        size = float(self.pixel_size.value)
        if size == 0:
            return None
        if not is_plausible_pixel_size(size):
            low, high = PLAUSIBLE_PIXEL_SIZE_UM
            raise WidgetInputError(f"pixel size {size:g} µm/px is not one a microscope gives ({low:g}-{high:g} "
                                   "µm/px): 0.25 for 40x, 0.5 for 20x; lowest for the image's own.")
        return size

    def _part(self, layer) -> tuple[Region | None, np.ndarray | None]:
        """The chosen part of ``layer`` in its level-0 px: a rectangle, and the polygon inside it."""
        if self.target.value == FIELD_OF_VIEW:
            return field_of_view(self._viewer, layer), None
        if self.target.value == SHAPE:
            return drawn_shape(self.shapes_layer.value, layer)
        return None, None

    def _configure(self):
        """The settings of a run, read here on the GUI thread: a function that, given the loaded
        segmenter (in the worker), sets its threshold and returns its tile and nucleus settings."""
        tiles = self.tile_settings()
        chosen = Thresholds(self.threshold.value, *self._chosen_instances())
        return lambda segmenter: apply_thresholds(segmenter, tiles, chosen)

    def _image_job(self, key, layer, image, region: Region | None, polygon: np.ndarray | None,
                   plane: tuple[int, ...] | None = None):
        """In memory, the whole image or a crop of it (outside a polygon: background); ``plane``:
        the index of the stack's plane that ``image`` is (its results land on that plane only)."""
        if region is not None:
            image = image[region.slices]
        mask = None if polygon is None else inside(polygon, region)
        cleanup = PostprocessSettings(self.min_object_size.value, self.fill_holes.value)
        given = self._given_pixel_size()
        configure, nuclei, size = self._configure(), self.nuclei.value, given or pixel_size_um(layer)
        if size is not None and not is_plausible_pixel_size(size):  # said in the layer's terms, not the CLI's
            low, high = PLAUSIBLE_PIXEL_SIZE_UM
            raise WidgetInputError(
                f"'{layer.name}' says its pixels are {size:g} µm wide (its scale {float(layer.scale[-1]):g}, "
                f"{_unit_name(layer)}), which no microscope gives ({low:g}-{high:g} µm/px): set its scale to its "
                "µm per pixel (0.25 for 40x, 0.5 for 20x), or to 1 to segment it as it is.")

        self._nuclei_last = nuclei and int(np.prod(image.shape[:2])) <= INSTANCE_MAX_PIXELS
        where = region_placement(layer, region)
        name, said = layer.name, ""
        if plane is not None:  # on that plane of the stack only: its own index on the stack's axes
            where = plane_placement(layer, plane, where)
            name = f"{layer.name} {list(plane)}"
            said = plane_said(self._viewer, layer, plane)

        def job():  # in the worker: widgets are read above, on the GUI thread
            segmenter = yield from self._iter_segmenter(key)
            settings, instance_settings = configure(segmenter)
            labels, instances, kept = yield from iter_segment_keeping(
                segmenter, image, settings, cleanup, instance_settings, nuclei, pixel_size_um=size)
            labels, instances = masked(labels, mask), masked(instances, mask)
            # the layers (colour tables, class votes, features) are made here, off the GUI
            # thread, which then only adds them
            class_kwargs, instance_kwargs = result_layer_kwargs(name, segmenter, labels, instances, where,
                                                                 None if region is None else (region.y, region.x),
                                                                 None if polygon is None else polygon - (region.y, region.x))
            # how the runtime was chosen ('runs in full precision (float32): ...') is said once per loaded
            # model, not under every run's counts, where it read as if this image had failed a check
            said_before = self._runtime_noted is segmenter
            self._runtime_noted = segmenter
            summary = result_summary(labels, instances, segmenter.foreground_threshold, segmenter.classes,
                                     nuclei, segmenter.last_report, segmenter.backend.notes if said_before else ())
            if said:  # below the counts, as the other notes are
                summary = with_notes(summary, [said])
            if size is None and segmenter.meta.pixel_size_um:
                summary = with_notes(summary, [unknown_pixel_size_note(
                    segmenter.meta.pixel_size_um, "The image records",
                    "set 'pixel size' above (0.5 at 20x) and segment again.")])
            if given:  # Objects measures µm² with it, as the image layer's scale would give it
                for kwargs in (class_kwargs, instance_kwargs):
                    if kwargs is not None:
                        kwargs["metadata"] = {**kwargs.get("metadata", {}), "pixel_size_um": size}
            layers = labels_layers(*(on_grid(a, where) for a in (labels, class_kwargs, instances, instance_kwargs)))
            return ImageRun(labels, instances, kept, segmenter, layer, region, mask, layers, summary, said)

        return job

    def _slide_job(self, key, layer, slide: dict, region: Region | None, polygon: np.ndarray | None):
        """A slide's region (or all of it) streamed to the results folder, as ``medseg predict SLIDE``,
        in a process of its own (``inference.slide_process``: its long steps would hold the GUI's
        interpreter lock); the result layers are made in the worker, the GUI only adds them."""
        self._nuclei_last = False  # a slide's phases say themselves
        out = self._results_folder(slide["path"])
        check_no_slide_results(out, file_stem(Path(slide["path"])), "results folder")  # before any work
        # torch threads: those set in this process where a script loaded torch, else the child's default
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch else None
        slide_job = SlideJob(
            model=key[0], slide=slide["path"], out_dir=str(out), device=key[1], backend=key[2],
            region=None if region is None else (region.x, region.y, region.width, region.height),
            polygon=None if polygon is None else np.asarray(polygon, float).tolist(),
            tiles=asdict(self.tile_settings()), nucleus_threshold=self.threshold.value,
            marker_threshold=self._chosen_instances()[0], min_nucleus=self._chosen_instances()[1],
            nuclei=self.nuclei.value, min_object_size=self.min_object_size.value,
            max_hole_size=self.fill_holes.value, flag="results folder", threads=threads,
            pixel_size_um=self._given_pixel_size())
        where, name = placement(layer), layer.name
        # a region small enough comes back as a map of its own, in memory: saved from the viewer,
        # measured by Objects, scored by Metrics, like a region of an image (a slide-sized pyramid
        # of a 0.26 Mpx region had been 'too large to save')
        in_memory = region is not None and region.width * region.height <= REGION_IN_MEMORY_PX
        region_where = region_placement(layer, region) if in_memory else None

        def job():
            result, model = yield from self._slide_process.run(slide_job)
            args = (slide_region_layer_args(result, model, name, region_where, polygon) if in_memory
                    else slide_layer_args(result, model, name, where))
            return SlideRun(result, model, layer, labels_layers(*args))

        return job

    def run(self, threaded: bool = True):
        """Segment the chosen image. ``threaded=False`` runs in the caller's thread (tests, scripts)
        and returns the class-map layer; otherwise returns the started worker."""
        try:
            job = self._prepare()
        except MedsegError as exc:  # bad model/file/settings/image/region: report, add nothing
            return self._fail(exc)
        self._stop_rethresholding()  # the last result's pending re-threshold would land in this run's layers
        self._run_layer = self.image_layer.value  # what the run segments, whatever the box shows later
        self.status.value = f"Loading the model, then segmenting '{self._run_layer.name}'..."
        self.progress.max, self.progress.value = 0, 0  # busy until the first tile reports
        self._set_running(True)
        self._cancel_requested = threading.Event()
        self._run_image_removed = False
        steps = _until_cancelled(job, self._cancel_requested)
        if not threaded:
            return self._run_here(steps())
        self._worker = start_worker(steps, on_error=self._on_error, yielded=self._on_progress, returned=self._on_done,
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
        return self._on_done(result, in_turns=False)

    def cancel(self) -> None:
        if self._worker is not None:
            self.status.value = ("Cancelling after the nuclei step under way (tens of seconds on a large image)..."
                                 if self._cutting_nuclei() else "Cancelling...")
            # takes effect at the next step (a batch, a watershed step, a block or a row of tiles): the
            # job is closed in the worker, so a slide run's half-written files are removed there
            self._cancel_requested.set()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        now = time.monotonic()
        # the tiles are done; the watershed's whole-image steps take minutes on a 36 Mpx image, which
        # had sat at 99 % under 'Segmenting' as if hung
        nuclei_next = (self._nuclei_last and total > INSTANCE_STEPS and done == total - INSTANCE_STEPS
                       and self._run_layer is not None and not self._cancel_requested.is_set())
        if self.progress.max != total:
            self.progress.max = total
            self.status.value = f"Segmenting '{self._run_layer.name}'..." if self._run_layer is not None else ""
        elif done < total and not nuclei_next and now - self._progress_shown < PROGRESS_INTERVAL_S:
            return  # a repaint per step would cost the viewer more than the bar tells
        if nuclei_next:
            self.status.value = (f"Cutting the nuclei of '{self._run_layer.name}' apart (a few whole-image steps: "
                                 "tens of seconds each on a large image)...")
        self._progress_shown = now
        self.progress.value = done

    def _cutting_nuclei(self) -> bool:
        return self._nuclei_last and self.progress.max > INSTANCE_STEPS and \
            self.progress.value >= self.progress.max - INSTANCE_STEPS

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            return self._on_cancelled()
        self._fail(exc)
        if self._segmenter_cache is not None and str(self._segmenter_cache[1].device) != "cpu":
            self._segmenter_cache[1].release()

    def _cancel_if_run_image_removed(self, event) -> None:
        """The image under way deleted from the viewer: its result has nowhere to go, so the run
        stops as Cancel stops it (a slide run's half-written files removed)."""
        if self._worker is not None and event.value is self._run_layer:
            self._run_image_removed = True
            self.cancel()

    def _removed_words(self) -> str:
        return f"'{self._run_layer.name}' was removed from the viewer during the run"

    def _on_cancelled(self) -> None:
        self._set_running(False)
        self.progress.max = max(self.progress.max, 1)
        self.status.value = (f"Cancelled: {self._removed_words()}; nothing was added." if self._run_image_removed
                             else "Cancelled; nothing was added.")
        if self._segmenter_cache is not None:
            self._segmenter_cache[1].release()
            self._segmenter_cache = None

    def _on_done(self, run, in_turns: bool = True):
        """``run``: an ``ImageRun`` (arrays in memory) or a ``SlideRun`` (files on disk). Its
        layers go in one per event-loop turn (``add_layers_in_turns``); the Run button comes back
        with the last. Cancel goes at once: the work is done, and a result half in the viewer
        could not be taken back by it."""
        self.cancel_button.enabled = False
        if self._run_layer is not None and self._run_layer not in self._viewer.layers:
            return self._result_dropped(run)
        if isinstance(run, SlideRun):
            self._classes, self._colors = run.model.classes, run.model.colors
            self._model_threshold = run.model.foreground_threshold
            self._model_instances = InstanceSettings(**run.model.instance_settings)
            # nothing is kept in memory: the thresholds apply to the next run
            self.kept, self.last_slide_result, self._run_note = None, run.result, ""
            summary = slide_summary(run.result)
        else:
            segmenter = run.segmenter
            self._classes, self._colors = segmenter.classes, segmenter.meta.colors
            self._model_threshold = segmenter.meta.foreground_threshold
            self._model_instances = segmenter.instance_settings
            self.kept, self._mask, self._report = run.kept, run.mask, segmenter.last_report
            self._run_note = run.note
            self.last_slide_result, summary = None, run.summary
            if str(segmenter.device) != "cpu":
                segmenter.release()  # give the GPU memory back between runs
        self.last_layer, self.last_instances_layer = run.layers
        self._edited = False
        for layer in run.layers:  # the user's corrections are theirs: no re-threshold remakes them
            if layer is not None:
                layer.events.paint.connect(self._on_result_painted)
        self._read_chosen_model()  # the run's model, unless another was chosen since

        self._summary = summary
        # drawn over a ground truth or an earlier run, the class colours mix into others' colours;
        # and the nuclei go over the image they were found in, not another one shown over it
        hidden = labels_under(self._viewer, run.layers) + images_over(self._viewer, self._run_layer, run.layers)
        for layer in hidden:
            layer.visible = False
        shown_image = self._run_layer is not None and not self._run_layer.visible
        if shown_image:
            self._run_layer.visible = True
        notes = ([f"Shown: '{self._run_layer.name}', the segmented image (it was hidden)."] if shown_image else []) \
            + ([hidden_words(hidden, 'the result')] if hidden else [])

        def shown():
            self.status.value = summary + "".join(f"\n\n{note}" for note in notes)
            self.legend.value = legend_html(self._classes, self._colors, pickable=True)
            self._set_running(False)
            self._scroll_to_status()

        add_layers_in_turns(self._viewer, list(run.layers), shown, in_turns, owner=self.native)
        return self.last_layer

    def _result_dropped(self, run) -> None:
        """The run finished after its image was deleted (past its last cancellable step): nothing
        goes into the viewer; a slide run's files stay where they were written, and are named."""
        self._set_running(False)
        if isinstance(run, SlideRun):
            self.status.value = (f"Done, not added: {self._removed_words()}. Its results are in "
                                 f"{run.result.files['store'].parent}")
        else:
            self.status.value = f"Not added: {self._removed_words()}."
            if str(run.segmenter.device) != "cpu":
                run.segmenter.release()
        return None

    # -- re-thresholding ---------------------------------------------------------
    def _on_result_painted(self, event=None) -> None:
        layer = getattr(event, "source", None)
        if layer is not None and layer not in (self.last_layer, self.last_instances_layer):
            return  # an earlier run's layers: not the ones a re-threshold would remake
        self._edited = True

    def _schedule_rethreshold(self, *_):
        """Debounced: a spin box held down re-thresholds once it settles."""
        if self.kept is None and self.last_slide_result is not None and self.run_button.enabled:
            # nothing of a slide run is kept in memory to remake it from: said, not silently ignored
            self.status.value = with_notes(self._summary, [SLIDE_THRESHOLDS_NOTE])
            return
        layers = self._viewer.layers
        if (self.kept is None and self.run_button.enabled
                and (self.last_layer in layers or self.last_instances_layer in layers)):
            # an image over KEEP_MAX_PIXELS keeps no probabilities: a 4200² one had kept its 0.34
            # result under a box saying 0.60, without a word
            self.status.value = with_notes(self._summary, [LARGE_IMAGE_THRESHOLDS_NOTE])
            return
        if self.kept is None or (self.last_layer is None and self.last_instances_layer is None):
            return
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer(self.native)  # goes with the dock: never fires into a closed one
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(lambda: self.rethreshold())
        self._timer.start(RETHRESHOLD_DEBOUNCE_MS)

    def rethreshold(self, threaded: bool = True):
        """Remake the last result from its kept probabilities for the current thresholds, in place
        (the layers keep their names, colours and places). Returns the worker, or with
        ``threaded=False`` the ``(class map, instances)``."""
        layers = self._viewer.layers
        if self.kept is None or not (self.last_layer in layers or self.last_instances_layer in layers):
            return None
        if self._edited:  # remaking the layers would erase the user's corrections (napari's undo cannot bring them back)
            self.status.value = ("The result was edited by hand, so it is not remade for the new thresholds (that "
                                 "would erase the edits); they apply to the next run.")
            return None
        # the run it remakes: a newer run's layers are never written with this one's result
        target = (self.kept, self.last_layer, self.last_instances_layer)
        # nuclei deleted by the user are not remade (nor counted in the status, as if they were there)
        thresholds, nuclei = self.thresholds(), self.last_instances_layer in layers
        mask, classes, colors, report = self._mask, self._classes, self._colors, self._report
        runtime_notes = self._runtime_noted.backend.notes if self._runtime_noted is not None else ()
        notes = [self._run_note] if self._run_note else []
        if self.last_instances_layer is not None and not nuclei:
            notes.append(f"'{self.last_instances_layer.name}' was deleted: the new thresholds remake the class map alone.")
        name = self.last_instances_layer.name if nuclei else ""
        nuclei_asked = self.nuclei.value and nuclei

        def prepared(labels, instances):  # in the worker: the GUI thread only swaps the arrays in
            labels, instances = masked(labels, mask), masked(instances, mask)
            kwargs = None if instances is None else nuclei_kwargs(name, classes, colors, labels, instances)
            summary = result_summary(labels, instances, thresholds.nucleus, classes, nuclei_asked, report,
                                     runtime_notes)
            return labels, instances, kwargs, with_notes(summary, notes)

        if not threaded:
            return self._show_rethresholded(prepared(*self.kept.result(thresholds, nuclei)), target)
        self._stop_rethresholding()

        def job():
            labels, instances = yield from self.kept.iter_result(thresholds, nuclei)
            return prepared(labels, instances)

        self._rethreshold_worker = start_worker(job, on_error=self._fail,
                                                returned=lambda result: self._show_rethresholded(result, target))
        return self._rethreshold_worker

    def _stop_rethresholding(self) -> None:
        """A re-threshold waiting or under way is dropped (a new run, or a newer re-threshold)."""
        if self._timer is not None:
            self._timer.stop()
        if self._rethreshold_worker is not None:
            self._rethreshold_worker.quit()
            self._rethreshold_worker = None

    def _show_rethresholded(self, result, target: tuple):
        labels, instances, instance_kwargs, summary = result
        kept, class_layer, instances_layer = target
        if kept is not self.kept:  # a run finished since: this result is of the one before
            return None
        layers = self._viewer.layers
        if class_layer not in layers and instances_layer not in layers:
            return None
        if class_layer in layers:  # the user may have deleted one of the two: the other still follows
            class_layer.data = as_layer(labels, class_layer)
        if instances is not None and instances_layer in layers:
            # new ids take their own class colours and names, not those of the old ids
            replace_instances(instances_layer, as_layer(instances, instances_layer), instance_kwargs)
        self.status.value = summary
        return labels, instances


# a slide region at most this large (level-0 px) comes back in memory (~5 bytes a pixel: its
# class map and nuclei), a 4096 x 4096 one in 84 MB; a larger one as lazy slide-sized pyramids
REGION_IN_MEMORY_PX = 4096 * 4096


SLIDE_THRESHOLDS_NOTE = ("a slide's result is written to its results folder, not kept in memory, so it is not "
                         "remade for the new thresholds; they apply to the next run.")


def _not_a_slide(layer) -> str:
    """Why 'whole slide' cannot run on ``layer``: a flat image file the plugin read into memory (it
    had been told to open it with the reader it had been opened with), or one not read by it."""
    source = getattr(getattr(layer, "source", None), "path", None)
    instead = f"choose '{WHOLE_IMAGE}', or the field of view or a drawn region for part of it"
    if source and getattr(layer.source, "reader_plugin", None) == "napari-medseg":  # napari.yaml's name
        return (f"'{layer.name}' is an image read into memory, not a slide: flat image files open as slides from "
                f"{LAZY_MIN_PIXELS / 1e6:.0f} Mpx, pyramidal TIFFs and slide formats always; {instead} "
                "(for a streamed run of a large flat TIFF: medseg predict, or save it as a pyramidal TIFF).")
    return (f"'{layer.name}' was not opened as a slide (drag the slide file into napari, or open it with the "
            f"napari-medseg reader); {instead}.")


LARGE_IMAGE_THRESHOLDS_NOTE = (f"an image over {KEEP_MAX_PIXELS / 1e6:.0f} Mpx keeps no probabilities in memory to "
                               "remake its result from, so it is not remade for the new thresholds; they apply to "
                               "the next run (or segment the field of view or a region).")
MODEL_THRESHOLD_TEXT = "model's"  # what a threshold box shows at its lowest value (the model's own)
IMAGE_PIXEL_SIZE_TEXT = "image's own"  # what the pixel size box shows at 0 (what the image records)
MODEL_MIN_NUCLEUS = -1  # the min nucleus box's value for "the model's own"


def _until_cancelled(job, cancel: threading.Event):
    """A generator function: ``job()``'s steps until ``cancel`` is set, then ``job``'s generator is
    closed where it runs (its half-written files go, off the GUI thread) and ``Cancelled`` raised."""

    def steps():
        inner = job()
        while True:
            if cancel.is_set():
                inner.close()
                raise Cancelled("Cancelled.")
            try:
                step = next(inner)
            except StopIteration as finished:
                return finished.value
            yield step

    return steps


def _unit_name(layer) -> str:
    """The layer's x unit as a user reads it ('nanometer'; napari's default, 'pixel', as 'no unit')."""
    units = getattr(layer, "units", None)
    name = str(units[-1]) if units else "pixel"
    return "no unit" if name == "pixel" else name
