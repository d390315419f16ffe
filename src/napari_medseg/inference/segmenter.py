"""The user-facing object: a loaded model and its metadata that segments images of any size.

``Segmenter.load`` builds the network a checkpoint describes, folds and fuses it for inference
(checked against the original outputs), picks who runs it (``backends``: PyTorch, or its ONNX
export through OpenVINO / ONNX Runtime on the CPU) and keeps its tuned foreground threshold; ``segment``
cuts, stitches and drives (``windows``, ``blend``, ``steps``) at flat memory; ``segment_nuclei``
also splits the class map into nuclei (``nuclei.watershed``), seeded by the model's distance
head where it has one. Every method has an ``iter_`` twin: a step generator that a GUI worker
drives with progress and cancel.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..io.images import read_image
from ..io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM, file_pixel_size_um, is_plausible_pixel_size
from ..nuclei.watershed import INSTANCE_MAX_PIXELS, INSTANCE_STEPS, InstanceSettings, iter_semantic_to_instances
from ..models import CheckpointMeta, load_checkpoint, read_meta, resolve_model_path
from ..models.quantise import CALIBRATION_TILE, calibration_tiles, int8_plan
from ..steps import CancelCheck, ProgressCallback, chain, run_steps
from . import runtime_record
from .backends import Backend, choose_backend, recorded_backend, torch_backend
from .blend import iter_blend
from .run_report import RunReport
from .postprocess import PostprocessSettings, postprocess_class_map
from .rescale import (MAX_UPSCALE, PixelSizeError, checked_pixel_size, iter_segment_rescaled, model_scale,
                      settings_at_image_scale)
from .settings import InferenceSettingsError, TileSettings
from .source import DARK_NOTE, ImageSource


# a real CoNSeP H&E tile shipped with the package (also napari's sample): the runtime check's probe
SAMPLE_TILE = Path(__file__).resolve().parents[1] / "sample_data" / "consep_train_19_005.png"


# fewer model pixels than this on a side hold no whole nucleus with its surroundings (a nucleus is
# 20-40 px across at 0.25 µm/px): an 8 x 8 image came back empty, and only 'the image is gray' was said
SMALL_IMAGE_SIDE = 32


def small_image_note(height: int, width: int) -> str:
    return (f"the image is only {width} x {height} px: too small to show whole nuclei with what surrounds them; "
            f"segment a larger field (at least {SMALL_IMAGE_SIDE} px on a side at the model's pixel size)")


# a colour (H&E) model on a gray image segments far worse: nucleus Dice 0.20 against 0.77 for the
# colour original of a CoNSeP patch with the shipped model; the user should know
GRAY_NOTE = ("the image is gray but the model was trained on colour (H&E) images: expect poor results; "
             "segment the colour scan, or train a model on gray images")


# magnifications a user may type for a pixel size; 40 and more are already outside the plausible range
COMMON_MAGNIFICATIONS = (2, 2.5, 4, 5, 10, 20)


def _check_kind(value, kind: type, name: str, example: str) -> None:
    """Settings passed as a dict (or anything else) are refused by name, not deep in a run."""
    if value is not None and not isinstance(value, kind):
        raise InferenceSettingsError(f"{name} must be of type {kind.__name__}, e.g. {example}; got a "
                                     f"{type(value).__name__}.")


class Segmenter:
    """A loaded model with its metadata: ``segment(image) -> uint8 class map``."""

    def __init__(self, model, meta: CheckpointMeta, device, backend: Backend | None = None):
        # ``model``: the PyTorch network; None for a runtime loaded from its record (``load_recorded``)
        self.model, self.meta, self.device = model, meta, device
        # who runs the network; PyTorch (``model``) unless ``load`` found a faster runtime that agrees
        self.backend = backend if backend is not None else torch_backend(model)
        self.last_report = self._new_report()
        # the model's tuned operating point (None: argmax); callers may override it per run
        self.foreground_threshold = meta.foreground_threshold
        # how a foreground pixel's class is chosen (``classify``): the model's tuned weights, if any
        self.class_weights = list(meta.class_choice_weights) or None

    @classmethod
    def load(cls, model: str | os.PathLike = "default", device: str = "auto", backend: str = "torch",
             precision: str = "auto", recorded: bool = False) -> "Segmenter":
        """``backend``: ``torch``, ``openvino``, ``onnxruntime`` or ``auto`` (the fastest that is installed
        and agrees with PyTorch on this machine; see ``backends``). ``precision``: ``auto`` lets a runtime
        use bf16 where the CPU has it and the class maps agree, ``fp32`` never; ``int8`` (opt-in)
        quantises by the network's measured plan (``models.quantise.INT8_PLANS``, the shipped
        default's: 0.09 % of its held-out class-map pixels change) or whole (about 0.8 %).
        ``recorded``: where an earlier load on this machine recorded its choice for these arguments,
        load by it (``load_recorded``: the runtime alone, no torch); else as usual."""
        if recorded:
            found = cls.load_recorded(model, device, backend, precision)
            if found is not None:
                return found
        import torch

        from ..devices import resolve_device
        from ..models.optimise import optimise_for_inference

        dev = resolve_device(device)
        path = resolve_model_path(str(model))
        net, meta = load_checkpoint(path, device=dev)
        side = max(64, 2 * meta.model.output_stride)
        probe = torch.rand(1, meta.model.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(dev)
        segmenter = cls(optimise_for_inference(net, check_input=probe), meta, dev)
        probe = segmenter._runtime_probe() if backend != "torch" else None
        segmenter.backend = choose_backend(backend, net, segmenter.model, path, meta.model.in_channels,
                                           len(meta.classes), dev, probe, precision,
                                           calibration=segmenter._calibration,
                                           int8_plan=int8_plan(meta.model.architecture, meta.model.encoder))
        segmenter.last_report = segmenter._new_report()
        runtime_record.remember(path, backend, precision, device, segmenter.backend)
        return segmenter

    @classmethod
    def load_recorded(cls, model: str | os.PathLike = "default", device: str = "auto", backend: str = "auto",
                      precision: str = "auto", threads: int | None = None) -> "Segmenter | None":
        """The segmenter ``load`` made for the same arguments on this machine, rebuilt from its
        record (``runtime_record``) with the runtime alone: no torch, no network built, no check
        run again. None where there is no such record (never loaded so, PyTorch chosen, another
        runtime version): call ``load``. ``threads``: the runtime's (default ``runtime_threads``)."""
        path = resolve_model_path(str(model))
        choice = runtime_record.recorded(path, backend, precision, device)
        if choice is None:
            return None
        meta = read_meta(path)
        runner = recorded_backend(choice.runtime, choice.graph, choice.precision, choice.notes, threads)
        return cls(None, meta, "cpu", runner)

    def _runtime_probe(self):
        """What a runtime's outputs are checked on at load: the real H&E tile shipped with the
        package, normalised as a run would (class maps on noise say little about a reduced
        precision), or noise for models that do not take RGB."""
        import torch

        channels, stride = self.meta.model.in_channels, self.meta.model.output_stride
        if channels == 3 and SAMPLE_TILE.is_file():
            image = read_image(SAMPLE_TILE)[:, :, :3]
            side = min(image.shape[0], image.shape[1]) // stride * stride
            if side:
                return torch.from_numpy(self.normalise(image[:side, :side])).permute(2, 0, 1)[None].contiguous()
        side = max(128, 2 * stride)
        return torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(1))

    def _calibration(self) -> list[np.ndarray] | None:
        """Int8 calibration inputs: the shipped MoNuSeg crop's tiles for RGB models (what the
        int8 plans were validated with), else None (the probe's tiles)."""
        if self.meta.model.in_channels != 3 or not CALIBRATION_TILE.is_file():
            return None
        return calibration_tiles(self.normalise)

    def _new_report(self) -> RunReport:
        return RunReport(backend=self.backend.name, precision=self.backend.precision,
                         notes=list(self.backend.notes))

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def instance_settings(self) -> InstanceSettings:
        """How nuclei are cut by default: the model's recorded settings (``medseg tune-nuclei``)
        over ``InstanceSettings``' defaults. Callers may pass their own per run."""
        return InstanceSettings.recorded(self.meta.instance_settings)

    def instance_settings_with(self, overrides: dict | None = None) -> InstanceSettings:
        """The model's nucleus settings with ``overrides`` (field -> value) in place; raises
        ``InferenceSettingsError`` naming a value that cannot work."""
        known = {f.name for f in fields(InstanceSettings)}
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise InferenceSettingsError(f"Nucleus settings have no {', '.join(map(repr, unknown))}; they are "
                                         f"{', '.join(sorted(known))}.")
        chosen = replace(self.instance_settings, **(overrides or {}))
        wrong = chosen.errors()
        if wrong:
            raise InferenceSettingsError(f"Nucleus settings: {'; '.join(wrong)}.")
        return chosen

    @property
    def has_distance_head(self) -> bool:
        """Whether the model also predicts the nucleus distance map that separates touching nuclei."""
        return bool(self.meta.model.distance_head)

    def _mean_std(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.meta.normalization.get("mean", [0.0]), np.float32)
        std = np.asarray(self.meta.normalization.get("std", [1.0]), np.float32)
        if mean.size not in (1, channels) or std.size not in (1, channels):
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return mean, std

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """A whole image -> model input ``(H, W, Cin)`` float32 (the statistics of this image)."""
        source = ImageSource(image, self.meta.model.in_channels)
        return self._normaliser()(source.rows01(0, source.height))

    def _normaliser(self) -> Callable[[np.ndarray], np.ndarray]:
        mean, std = self._mean_std(self.meta.model.in_channels)
        if np.all(mean == 0) and np.all(std == 1):
            return lambda x: x
        scale = (1.0 / std).astype(np.float32)
        return lambda x: (x - mean) * scale

    def iter_segment(self, image, settings: TileSettings | None = None,
                     postprocess: PostprocessSettings | None = None, out=None, probabilities_out=None,
                     distance_out=None, pixel_size_um: float | None = None):
        """Generator: yields ``(done, total)`` tiles, returns the class map (uint8 ``(H, W)``).

        ``image``: numpy or lazy array (see ``ImageSource``), or an ``ImageSource``; ``out``/``probabilities_out``:
        optional writable arrays for the class map ``(H, W)`` and probabilities ``(C, H, W)``;
        ``distance_out``: ``(H, W)`` array for the predicted nucleus distance map (models with a
        distance head only). ``pixel_size_um``: the image's µm/px, if known; where it differs from
        the model's, the network sees the image resampled to the model's pixel size (``rescale``)
        and every output is on the image's own grid. ``postprocess`` sizes are model pixels.
        """
        _check_kind(settings, TileSettings, "settings", "TileSettings(tile_size=256)")
        _check_kind(postprocess, PostprocessSettings, "postprocess", "PostprocessSettings(min_object_size=30)")
        settings = (settings or TileSettings()).checked(self.meta.model.output_stride)
        source = image if isinstance(image, ImageSource) else ImageSource(image, self.meta.model.in_channels)
        n = len(self.classes)
        if out is not None and tuple(out.shape) != (source.height, source.width):
            raise InferenceSettingsError(f"Output array {tuple(out.shape)} does not match the image {(source.height, source.width)}.")
        if probabilities_out is not None and tuple(probabilities_out.shape) != (n, source.height, source.width):
            raise InferenceSettingsError(
                f"Probability array {tuple(probabilities_out.shape)} does not match {(n, source.height, source.width)}."
            )
        if distance_out is not None:
            if not self.has_distance_head:
                raise InferenceSettingsError("This model has no distance head: it predicts no distance map.")
            if tuple(distance_out.shape) != (source.height, source.width):
                raise InferenceSettingsError(
                    f"Distance array {tuple(distance_out.shape)} does not match the image {(source.height, source.width)}.")
        self.last_report = self._new_report()
        if self.model is not None:
            self.model.to(self.device)  # back from ``release``, if it was released
        factor = self.scale_for(pixel_size_um)
        zoom = self.network_zoom_for(settings)
        if factor * zoom != 1.0:
            out = out if out is not None else np.zeros((source.height, source.width), np.uint8)
            # the blocks run at zoom 1: the enlargement is done here, once
            labels = yield from iter_segment_rescaled(self, source, factor * zoom, replace(settings, network_zoom=1.0),
                                                      out, probabilities_out, distance_out)
            # gray and dark-field are said of the whole image, below: a block of glass alone had
            # called a colour image gray
            self.last_report.notes = [n for n in self.last_report.notes if n not in (GRAY_NOTE, DARK_NOTE)]
            if factor != 1.0:  # the model's own zoom is how it runs, not news about the image
                self.last_report.notes.append(f"resampled x{factor:.3g} to the model's pixel size "
                                              f"({self.meta.pixel_size_um:g} µm/px) and back")
                postprocess, _ = settings_at_image_scale(factor, postprocess)
        else:
            runner = self.model if self.backend.name == "torch" else self.backend
            labels = yield from iter_blend(runner, source, n, settings, self.device, self._normaliser(),
                                           out=out, probabilities_out=probabilities_out, report=self.last_report,
                                           distance_head=self.has_distance_head, distance_out=distance_out,
                                           foreground_threshold=self.foreground_threshold,
                                           class_weights=self.class_weights)
        if postprocess is not None and postprocess.active:
            postprocess_class_map(labels, postprocess)
        side = min(source.height, source.width) * factor  # at the model's pixel size
        if side < SMALL_IMAGE_SIDE:
            self.last_report.notes.append(small_image_note(source.height, source.width))
        if self.meta.model.in_channels == 3 and GRAY_NOTE not in self.last_report.notes and source.looks_gray():
            self.last_report.notes.append(GRAY_NOTE)
        if self.meta.model.in_channels == 3 and DARK_NOTE not in self.last_report.notes and source.looks_dark_field():
            self.last_report.notes.append(DARK_NOTE)
        return labels

    def network_zoom_for(self, settings: TileSettings | None = None) -> float:
        """How much the network's input is enlarged over the model's pixel grid: ``settings``'
        ``network_zoom`` where given, else the model's measured one."""
        asked = settings.network_zoom if settings is not None else None
        return float(asked if asked is not None else self.meta.network_zoom)

    def scale_for(self, pixel_size_um: float | None) -> float:
        """Model pixels per pixel of an image of ``pixel_size_um`` µm/px (1.0: the image is used as it
        is; ``None`` or 0: its pixel size is unknown, taken as the model's). A size no microscope gives
        is refused, as ``medseg predict --pixel-size`` refuses it: 100 (a magnification, or nm taken for
        µm) had upscaled an 8 px image 400-fold, 21 s for it; so is one more than ``MAX_UPSCALE``
        times the model's (``PixelSizeError``, saying the magnification it may have been)."""
        size = checked_pixel_size(pixel_size_um, "image's pixel size")
        model_size = self.meta.pixel_size_um
        if size is not None and model_size and not is_plausible_pixel_size(size):
            low, high = PLAUSIBLE_PIXEL_SIZE_UM
            raise PixelSizeError(f"The image's pixel size, {size:g} µm/px, is not one a microscope gives ({low:g}-"
                                 f"{high:g} µm/px): give it in µm per pixel (0.25 for 40x, 0.5 for 20x), or none "
                                 "to take the image as it is.")
        factor = model_scale(size, model_size)
        if factor > MAX_UPSCALE:
            magnification = (f" Was {size:g} the magnification? A {size:g}x scan is about {10 / size:.2g} µm/px."
                             if size in COMMON_MAGNIFICATIONS else "")
            raise PixelSizeError(
                f"The image's pixel size, {size:g} µm/px, is {factor:.0f}x coarser than the model's {model_size:g} "
                f"µm/px: its nuclei are only a few pixels across, too few to cut (the image would be enlarged "
                f"{factor:.0f}-fold). The model takes images down to {model_size * MAX_UPSCALE:.2g} µm/px (about "
                f"10x); scan or export at a higher magnification, or give none to take the image as it is."
                + magnification)
        return factor

    def iter_probabilities(self, image, settings: TileSettings | None = None):
        """Generator: yields ``(done, total)`` tiles, returns float32 probabilities ``(C, H, W)`` in memory."""
        source = ImageSource(image, self.meta.model.in_channels)
        probs = np.zeros((len(self.classes), source.height, source.width), np.float32)
        yield from self.iter_segment(source, settings, probabilities_out=probs)  # checked and measured once
        return probs

    def probabilities(self, image, settings: TileSettings | None = None,
                      progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
        """Float32 class probabilities ``(C, H, W)`` of the image as it is (no resampling: for
        probabilities at an image's pixel size, ``segment(..., pixel_size_um=, probabilities_out=)``).
        ``progress(done, total)`` is called as tiles finish; ``should_cancel()`` returning True stops
        the run by raising ``napari_medseg.steps.Cancelled``."""
        return run_steps(self.iter_probabilities(image, settings), progress, should_cancel)

    def segment(self, image, settings: TileSettings | None = None,
                progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                postprocess: PostprocessSettings | None = None, out=None, probabilities_out=None, distance_out=None,
                pixel_size_um: float | None = None):
        """The class map, uint8 ``(H, W)``: ids into ``self.classes``; see ``iter_segment``.
        ``progress(done, total)`` is called as tiles finish; ``should_cancel()`` returning True stops
        the run by raising ``napari_medseg.steps.Cancelled``. What the run noticed (a gray or
        dark-field image, a resampling) is in ``self.last_report.notes`` until the next run."""
        return run_steps(self.iter_segment(image, settings, postprocess, out, probabilities_out, distance_out,
                                           pixel_size_um), progress, should_cancel)

    def iter_segment_nuclei(self, image, settings: TileSettings | None = None,
                            postprocess: PostprocessSettings | None = None,
                            instance_settings: InstanceSettings | None = None, probabilities_out=None,
                            pixel_size_um: float | None = None):
        """Generator like ``iter_segment``; returns ``(class map, instances)``, int32 nucleus ids.

        Yields ``(done, total)`` over the tiles and then the watershed's ``INSTANCE_STEPS``
        whole-image steps (``total`` counts both), so a cancel also gets in between those.

        Instances are seeded from the model's distance map where it has a distance head,
        from the distance transform of its class map otherwise (``semantic_to_instances``).
        Above ``INSTANCE_MAX_PIXELS`` only the class map is made and instances are ``None``.
        Sizes in ``instance_settings`` (default: the model's, ``instance_settings``) are model
        pixels, converted for an image of ``pixel_size_um``.
        """
        _check_kind(instance_settings, InstanceSettings, "instance_settings",
                    "segmenter.instance_settings_with({'min_size': 30})")  # before the network runs, not after
        source = image if isinstance(image, ImageSource) else ImageSource(image, self.meta.model.in_channels)
        _, instance_settings = settings_at_image_scale(self.scale_for(pixel_size_um), None,
                                                       instance_settings or self.instance_settings)
        fits = source.height * source.width <= INSTANCE_MAX_PIXELS
        distance = np.zeros((source.height, source.width), np.float32) if fits and self.has_distance_head else None
        tiles = self.iter_segment(source, settings, postprocess, probabilities_out=probabilities_out,
                                  distance_out=distance, pixel_size_um=pixel_size_um)
        if not fits:
            labels = yield from tiles
            return labels, None
        # one progress scale for both phases: the tiles, then the watershed's whole-image steps
        # (seconds each on large images), between which a cancel gets in
        return (yield from chain(tiles, INSTANCE_STEPS,
                                 lambda labels: iter_semantic_to_instances(labels, instance_settings, distance)))

    def segment_nuclei(self, image, settings: TileSettings | None = None,
                       progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                       postprocess: PostprocessSettings | None = None,
                       instance_settings: InstanceSettings | None = None, probabilities_out=None,
                       pixel_size_um: float | None = None):
        """``(class map, instances or None)``; see ``iter_segment_nuclei``; ``progress``,
        ``should_cancel`` and ``last_report`` as for ``segment``. A table of the nuclei (area, µm²,
        class, centroid): ``napari_medseg.nuclei.measure.object_table``."""
        return run_steps(self.iter_segment_nuclei(image, settings, postprocess, instance_settings, probabilities_out,
                                                  pixel_size_um), progress, should_cancel)

    def release(self) -> None:
        """Free GPU memory held by the model (after a run or a cancel)."""
        if self.model is None:  # a runtime on the CPU: nothing on a GPU
            return
        import torch

        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def segment_file(path: str | Path, segmenter: Segmenter, settings: TileSettings | None = None,
                 progress: ProgressCallback | None = None, pixel_size_um: float | None = None) -> np.ndarray:
    """The class map of one image file (read whole: see ``io.lazy`` for whole slides), segmented at
    the model's pixel size where the file records its own (as ``medseg predict`` does: a 20x TIFF
    had been taken as 40x); ``pixel_size_um`` overrides what the file records."""
    size = pixel_size_um if pixel_size_um is not None else file_pixel_size_um(path)
    return segmenter.segment(read_image(path), settings, progress, pixel_size_um=size)
