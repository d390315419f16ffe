"""Tiled prediction of images of any size, blended seam-free, at flat memory.

The engine walks the image in rows of overlapping tiles (see ``tiling``). Each tile's softmax
is weighted by a blend map and added into a band buffer a few tile rows high; as soon as no
later tile can touch a row, that row is final: it is divided by the summed weights, turned
into a uint8 class map (and, on request, float16 probabilities) and dropped from the buffer.
Memory therefore grows with the image *width*, never its area, and the input may be a lazy
array (dask/zarr/memmap, e.g. a tiled whole-slide TIFF) read one strip of rows at a time.

Normalisation statistics are computed once per image. Near-white glass tiles of H&E images
are background without running the model. On CUDA the model runs under autocast and a
batch that runs out of memory is split in halves until it fits.

The work is a generator yielding ``(tiles_done, tiles_total)`` after every batch; stopping it
between yields abandons the run (that is how cancelling works: within one batch, and nothing
half-made is returned). ``run_steps`` drives it with progress and cancel callbacks.

A model with a distance head has one more output channel after its classes: a sigmoid
nucleus distance map, blended like the probabilities, that seeds the watershed splitting
the class map into nuclei (``Segmenter.segment_nuclei``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from .devices import resolve_device
from .instances import INSTANCE_MAX_PIXELS, INSTANCE_STEPS, InstanceSettings, iter_semantic_to_instances
from .io.images import ImageReadError, intensity_range, scale_to_unit, validate_image_array
from .models import CheckpointMeta, load_checkpoint, resolve_model_path
from .models.optimise import optimise_for_inference
from .postprocess import PostprocessSettings, postprocess_class_map
from .tiling import (
    InferenceSettingsError, TileSettings, blend_weights, gaussian_weights, glass_fraction, tile_starts,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
FINALISE_COLUMNS = 1024  # finished rows are divided and argmaxed this many columns at a time
_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class Cancelled(Exception):
    """The caller asked to stop; no result was produced."""


class InferenceMemoryError(RuntimeError):
    """Even one tile does not fit in the device's memory."""


@dataclass
class RunReport:
    """What one run did, for logs, status lines and tests."""

    tiles: int = 0
    skipped_background: int = 0
    forward_passes: int = 0
    batch_size: int = 0  # after any out-of-memory halving
    out_of_memory_retries: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the image source


class ImageSource:
    """Rows of a 2-D gray or RGB image, read on demand and mapped to float32 ``[0, 1]``.

    ``array`` may be a numpy array (checked whole, as ``validate_image_array``) or any lazy
    array with ``shape``, ``dtype`` and slicing (dask, zarr, memmap) in ``(H, W)``,
    ``(H, W, 3|4)`` or ``(3|4, H, W)`` layout, with optional leading axes of size 1.
    """

    def __init__(self, array, channels: int):
        self.channels = channels
        if isinstance(array, np.ndarray) or not hasattr(array, "shape"):
            self._array = validate_image_array(np.asarray(array))
            self._channel_first = False
            self._lazy = False
        else:
            self._array, self._channel_first = _lazy_plane(array)
            self._lazy = True
        shape = self._array.shape
        self.height, self.width = (shape[1], shape[2]) if self._channel_first else (shape[0], shape[1])
        self.rgb = len(shape) == 3
        self.value_range = intensity_range(self._array_hwc_rows_view())

    def _array_hwc_rows_view(self):
        return _RowsView(self) if self._channel_first else self._array

    def raw_rows(self, top: int, bottom: int) -> np.ndarray:
        if self._channel_first:
            return np.moveaxis(np.asarray(self._array[:, top:bottom]), 0, -1)
        return np.asarray(self._array[top:bottom])

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as stored (``(h, W)`` or ``(h, W, 3)``), checked for NaN."""
        raw = self.raw_rows(top, bottom)
        if raw.ndim == 3 and raw.shape[-1] == 4:
            raw = raw[..., :3]
        if self._lazy and np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise ImageReadError(f"image: rows {top}-{bottom} contain NaN or infinite pixels.")
        return raw

    def rows01(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as float32 ``(h, W, channels)`` in ``[0, 1]``."""
        return self.to01(self.rows(top, bottom))

    def to01(self, raw: np.ndarray) -> np.ndarray:
        """Pixels as stored -> float32 ``(..., channels)`` in ``[0, 1]``, with the image's statistics."""
        return scale_to_unit(raw, self.channels, self.value_range)


class _RowsView:
    """A channel-last view of a channel-first lazy array, for row sampling only."""

    def __init__(self, source: ImageSource):
        self._source, self.shape = source, (source.height, source.width, source._array.shape[0])
        self.dtype = source._array.dtype

    def __getitem__(self, rows: slice):
        return self._source.raw_rows(rows.start, rows.stop)


def _lazy_plane(array):
    """(array, channel_first) for a lazy array, without reading pixels; clear errors otherwise."""
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageReadError(f"image: unsupported pixel type {dtype}; expected integer or float pixels.")
    while len(shape) > 3 and shape[0] == 1 or (len(shape) == 3 and shape[0] == 1 and shape[-1] not in (3, 4)):
        array, shape = array[0], shape[1:]
    if len(shape) == 3 and shape[-1] == 1:
        array, shape = array[..., 0], shape[:2]
    channel_first = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
    if not (len(shape) == 2 or (len(shape) == 3 and (shape[-1] in (3, 4) or channel_first))):
        raise ImageReadError(
            f"image: shape {shape} is not a 2-D gray, RGB or RGBA image. Stacks, time series and "
            "multi-channel (>4) data are not supported; segment one 2-D plane at a time."
        )
    h, w = (shape[1], shape[2]) if channel_first else (shape[0], shape[1])
    if h == 0 or w == 0:
        raise ImageReadError(f"image: the image is empty (shape {shape}).")
    return array, channel_first


# --------------------------------------------------------------------------- the model call


def _prepare_model(model: torch.nn.Module, settings: TileSettings, device: torch.device) -> torch.nn.Module:
    model.eval()
    if settings.channels_last:
        first = next((p for p in model.parameters() if p.ndim == 4), None)
        if first is not None and not first.is_contiguous(memory_format=torch.channels_last):
            model.to(memory_format=torch.channels_last)
    return model


def _forward_probabilities(model, x: torch.Tensor, settings: TileSettings, device: torch.device,
                           num_classes: int | None = None) -> torch.Tensor:
    """Softmax of the model's class channels (mean over flips with TTA), float32, on ``device``;
    channels after the first ``num_classes`` (a distance head) go through a sigmoid instead."""
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_amp = settings.amp and device.type == "cuda"
    dtype = torch.float16 if settings.amp_dtype == "float16" else torch.bfloat16
    flips = ([], [3], [2], [2, 3]) if settings.tta else ([],)
    total = None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
        for dims in flips:
            xin = torch.flip(x, dims) if dims else x
            logits = model(xin).float()
            if num_classes is None or logits.shape[1] == num_classes:
                p = torch.softmax(logits, dim=1)
            else:
                p = torch.cat([torch.softmax(logits[:, :num_classes], dim=1), torch.sigmoid(logits[:, num_classes:])], 1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    return total / len(flips) if len(flips) > 1 else total


class _Batcher:
    """Runs batches of normalised tiles, halving the batch on out-of-memory (GPU) errors."""

    def __init__(self, model, settings: TileSettings, device: torch.device, report: RunReport,
                 num_classes: int | None = None):
        self.model, self.settings, self.device, self.report = model, settings, device, report
        self.num_classes = num_classes
        self.limit = settings.batch_size
        self.weights = torch.tensor(blend_weights(settings.tile_size, settings.blend), device=device)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``(B, t, t, Cin)`` float32 -> weighted probabilities ``(B, C, t, t)`` float32 numpy."""
        outs, start = [], 0
        while start < len(tiles):
            chunk = tiles[start:start + self.limit]
            try:
                with torch.inference_mode():
                    x = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(self.device)
                    p = _forward_probabilities(self.model, x, self.settings, self.device, self.num_classes) * self.weights
                    outs.append(p.cpu().numpy())
                self.report.forward_passes += 1
                start += len(chunk)
            except _OOM_ERRORS as exc:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.limit == 1:
                    raise InferenceMemoryError(
                        f"Out of memory on {self.device} with a single {self.settings.tile_size}² tile; "
                        "use a smaller tile size or the CPU."
                    ) from exc
                self.limit = max(1, self.limit // 2)
                self.report.out_of_memory_retries += 1
                self.report.notes.append(f"out of memory: batch size lowered to {self.limit}")
                log.warning("Out of memory on %s: batch size lowered to %d.", self.device, self.limit)
        self.report.batch_size = self.limit
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


# --------------------------------------------------------------------------- the engine


def classify(probs: np.ndarray, foreground_threshold: float | None = None) -> np.ndarray:
    """Class ids from probabilities ``(C, ...)``: the argmax, or, with ``foreground_threshold``,
    the likeliest foreground class where the foreground probability ``1 - p[0]`` exceeds the
    threshold and background elsewhere (a tuned operating point, e.g. for under-calling models)."""
    if foreground_threshold is None or probs.shape[0] < 2:
        return probs.argmax(0)
    return np.where(1.0 - probs[0] > foreground_threshold, probs[1:].argmax(0) + 1, 0)


def iter_blend(model: torch.nn.Module, source: ImageSource, num_classes: int, settings: TileSettings,
               device: torch.device, normalise: Callable[[np.ndarray], np.ndarray] | None = None,
               out=None, probabilities_out=None, report: RunReport | None = None,
               distance_head: bool = False, distance_out=None, foreground_threshold: float | None = None,
               ) -> Generator[tuple[int, int], None, object]:
    """Generator: yields ``(tiles_done, tiles_total)`` after every batch; returns the class map.

    ``normalise`` maps ``[0, 1]`` pixels to model input (mean/std); ``out`` (``(H, W)``, any
    writable array, default a new uint8 numpy array) receives the class map row by row;
    ``probabilities_out`` (``(C, H, W)``, e.g. a float16 memmap) receives the blended
    probabilities when given. ``distance_head``: the model has one more output channel, a
    sigmoid distance map, blended like the probabilities and written to ``distance_out``
    (``(H, W)``) when given. ``foreground_threshold``: see ``classify``.
    """
    report = report if report is not None else RunReport()
    height, width = source.height, source.width
    tile, stride = settings.tile_size, settings.tile_size - settings.overlap
    padded_h, padded_w = max(height, tile), max(width, tile)
    ys, xs = tile_starts(padded_h, tile, stride), tile_starts(padded_w, tile, stride)
    total = len(ys) * len(xs)
    report.tiles, report.batch_size = total, settings.batch_size
    if out is None:
        out = np.zeros((height, width), np.uint8 if num_classes <= 256 else np.uint16)
    weights = blend_weights(tile, settings.blend)
    skip = settings.skip_background and source.rgb and source.channels == 3
    model = _prepare_model(model, settings, device)
    run_batch = _Batcher(model, settings, device, report, num_classes)
    channels = num_classes + int(distance_head)

    # The band buffer holds rows [base, base + band): the open tile rows a batch can span.
    rows_per_batch = math.ceil(settings.batch_size / len(xs))
    band = min(padded_h, tile + stride * rows_per_batch)
    acc = np.zeros((channels, band, padded_w), np.float32)
    norm = np.zeros((band, padded_w), np.float32)
    base = 0
    pending: list[tuple[int, int, np.ndarray]] = []  # (row index, x, normalised tile)
    done = 0

    def finalise(until: int) -> None:
        """Rows [base, until) are complete: write them out and slide the buffer."""
        nonlocal base
        n = until - base
        if n <= 0:
            return
        rows_out = min(until, height) - base
        for left in range(0, width if rows_out > 0 else 0, FINALISE_COLUMNS):  # column chunks: small temporaries
            right = min(width, left + FINALISE_COLUMNS)
            probs = acc[:, :rows_out, left:right] / norm[:rows_out, left:right]
            out[base:base + rows_out, left:right] = classify(probs[:num_classes], foreground_threshold).astype(
                out.dtype, copy=False)
            if probabilities_out is not None:
                probabilities_out[:, base:base + rows_out, left:right] = probs[:num_classes]
            if distance_out is not None:
                distance_out[base:base + rows_out, left:right] = probs[num_classes]
        acc[:, :band - n] = acc[:, n:]
        acc[:, band - n:] = 0
        norm[:band - n] = norm[n:]
        norm[band - n:] = 0
        base = until

    def add(row: int, x: int, probs: np.ndarray | None) -> None:
        top = ys[row] - base
        if probs is None:  # glass: certain background
            acc[0, top:top + tile, x:x + tile] += weights
        else:
            acc[:, top:top + tile, x:x + tile] += probs
        norm[top:top + tile, x:x + tile] += weights

    def flush() -> None:
        nonlocal pending, done
        if not pending:
            return
        probs = run_batch(np.stack([t for _, _, t in pending]))
        for (row, x, _), p in zip(pending, probs):
            add(row, x, p)
        done += len(pending)
        pending = []

    reported = 0
    for row, y in enumerate(ys):
        # Rows above the oldest tile row still in play are final.
        finalise(ys[pending[0][0]] if pending else y)
        if y + tile > base + band:  # no room for this row: run what is pending (a partial batch) first
            flush()
            finalise(y)
            if done > reported:
                reported = done
                yield done, total
        # The strip stays as stored (uint8 for H&E); tiles are converted one at a time.
        strip = source.rows(y, min(y + tile, height))
        if strip.shape[0] < tile or strip.shape[1] < tile:  # image smaller than a tile
            pad = ((0, tile - min(tile, strip.shape[0])), (0, max(0, tile - strip.shape[1])))
            strip = np.pad(strip, pad + ((0, 0),) * (strip.ndim - 2), mode="symmetric")
        skipped_in_row = 0
        for x in xs:
            tile01 = source.to01(strip[:, x:x + tile])
            if skip and 1.0 - glass_fraction(tile01, settings.background_level) <= settings.max_tissue_fraction:
                add(row, x, None)
                report.skipped_background += 1
                done += 1
                skipped_in_row += 1
                continue
            pending.append((row, x, normalise(tile01) if normalise is not None else tile01))
            if len(pending) >= settings.batch_size:
                flush()
                reported = done
                yield done, total
        if skipped_in_row == len(xs) and done > reported:
            reported = done
            yield done, total  # a row of glass: still report (and let a cancel in)
    flush()
    finalise(padded_h)
    if done > reported:
        yield done, total
    return out


def run_steps(steps: Generator, progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None):
    """Drive a step generator to its return value, reporting progress and polling for cancel."""
    while True:
        if should_cancel is not None and should_cancel():
            steps.close()
            raise Cancelled("Segmentation cancelled.")
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def iter_predict_probabilities(model: torch.nn.Module, image: np.ndarray, num_classes: int,
                               settings: TileSettings, device: torch.device,
                               distance_head: bool = False) -> Generator[tuple[int, int], None, np.ndarray]:
    """Blended probabilities ``(C, H, W)`` float32 of an image already in model input scale
    (normalised ``(H, W, Cin)`` float32), without background skipping; classes only when the
    model has a distance head."""
    image = np.asarray(image, np.float32)
    source = _PreparedSource(image)
    probs = np.zeros((num_classes, *image.shape[:2]), np.float32)
    plain = TileSettings(**{**settings.to_dict(), "skip_background": False})
    yield from iter_blend(model, source, num_classes, plain, device, None, probabilities_out=probs,
                          distance_head=distance_head)
    return probs


class _PreparedSource(ImageSource):
    """An image already normalised for the model: rows are handed over as they are."""

    def __init__(self, image: np.ndarray):
        self._array, self._channel_first, self._lazy = image, False, False
        self.height, self.width, self.channels = image.shape[0], image.shape[1], image.shape[2]
        self.rgb, self.value_range = False, None

    def rows(self, top: int, bottom: int) -> np.ndarray:
        return self._array[top:bottom]

    def to01(self, raw: np.ndarray) -> np.ndarray:
        return raw


def predict_probabilities(model: torch.nn.Module, image: np.ndarray, num_classes: int, settings: TileSettings,
                          device: torch.device, progress: ProgressCallback | None = None,
                          should_cancel: CancelCheck | None = None, distance_head: bool = False) -> np.ndarray:
    """Blended class probabilities ``(C, H, W)``; see ``iter_predict_probabilities``."""
    return run_steps(iter_predict_probabilities(model, image, num_classes, settings, device, distance_head),
                     progress, should_cancel)


# --------------------------------------------------------------------------- the user-facing object


class Segmenter:
    """A loaded model with its metadata: ``segment(image) -> uint8 class map``."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, device: torch.device):
        self.model, self.meta, self.device = model, meta, device
        self.last_report = RunReport()
        # the model's tuned operating point (None: argmax); callers may override it per run
        self.foreground_threshold = meta.foreground_threshold

    @classmethod
    def load(cls, model: str | os.PathLike = "default", device: str = "auto") -> "Segmenter":
        dev = resolve_device(device)
        net, meta = load_checkpoint(resolve_model_path(str(model)), device=dev)
        side = max(64, 2 * meta.model.output_stride)
        probe = torch.rand(1, meta.model.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(dev)
        return cls(optimise_for_inference(net, check_input=probe), meta, dev)

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

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
                     distance_out=None):
        """Generator: yields ``(done, total)`` tiles, returns the class map (uint8 ``(H, W)``).

        ``image``: numpy or lazy array (see ``ImageSource``), or an ``ImageSource``; ``out``/``probabilities_out``:
        optional writable arrays for the class map ``(H, W)`` and probabilities ``(C, H, W)``;
        ``distance_out``: ``(H, W)`` array for the predicted nucleus distance map (models with a
        distance head only).
        """
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
        self.last_report = RunReport()
        self.model.to(self.device)  # back from ``release``, if it was released
        labels = yield from iter_blend(self.model, source, n, settings, self.device, self._normaliser(),
                                       out=out, probabilities_out=probabilities_out, report=self.last_report,
                                       distance_head=self.has_distance_head, distance_out=distance_out,
                                       foreground_threshold=self.foreground_threshold)
        if postprocess is not None and postprocess.active:
            postprocess_class_map(labels, postprocess)
        return labels

    def iter_probabilities(self, image, settings: TileSettings | None = None):
        """Generator: yields ``(done, total)`` tiles, returns float32 probabilities ``(C, H, W)`` in memory."""
        source = ImageSource(image, self.meta.model.in_channels)
        probs = np.zeros((len(self.classes), source.height, source.width), np.float32)
        yield from self.iter_segment(source, settings, probabilities_out=probs)  # checked and measured once
        return probs

    def probabilities(self, image, settings: TileSettings | None = None,
                      progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
        return run_steps(self.iter_probabilities(image, settings), progress, should_cancel)

    def segment(self, image, settings: TileSettings | None = None,
                progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                postprocess: PostprocessSettings | None = None, out=None, probabilities_out=None, distance_out=None):
        return run_steps(self.iter_segment(image, settings, postprocess, out, probabilities_out, distance_out),
                         progress, should_cancel)

    def iter_segment_nuclei(self, image, settings: TileSettings | None = None,
                            postprocess: PostprocessSettings | None = None,
                            instance_settings: InstanceSettings | None = None, probabilities_out=None):
        """Generator like ``iter_segment``; returns ``(class map, instances)``, int32 nucleus ids.

        Yields ``(done, total)`` over the tiles and then the watershed's ``INSTANCE_STEPS``
        whole-image steps (``total`` counts both), so a cancel also gets in between those.

        Instances are seeded from the model's distance map where it has a distance head,
        from the distance transform of its class map otherwise (``semantic_to_instances``).
        Above ``INSTANCE_MAX_PIXELS`` only the class map is made and instances are ``None``.
        """
        source = image if isinstance(image, ImageSource) else ImageSource(image, self.meta.model.in_channels)
        fits = source.height * source.width <= INSTANCE_MAX_PIXELS
        distance = np.zeros((source.height, source.width), np.float32) if fits and self.has_distance_head else None
        tiles = self.iter_segment(source, settings, postprocess, probabilities_out=probabilities_out,
                                  distance_out=distance)
        if not fits:
            labels = yield from tiles
            return labels, None
        # one progress scale for both phases: the tiles, then the watershed's whole-image steps
        # (seconds each on large images), between which a cancel gets in
        total = 0
        while True:
            try:
                done, total = next(tiles)
            except StopIteration as finished:
                labels = finished.value
                break
            yield done, total + INSTANCE_STEPS
        nuclei = iter_semantic_to_instances(labels, instance_settings, distance)
        while True:
            try:
                step, _ = next(nuclei)
            except StopIteration as finished:
                return labels, finished.value
            yield total + step, total + INSTANCE_STEPS

    def segment_nuclei(self, image, settings: TileSettings | None = None,
                       progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                       postprocess: PostprocessSettings | None = None,
                       instance_settings: InstanceSettings | None = None, probabilities_out=None):
        """``(class map, instances or None)``; see ``iter_segment_nuclei``."""
        return run_steps(self.iter_segment_nuclei(image, settings, postprocess, instance_settings, probabilities_out),
                         progress, should_cancel)

    def release(self) -> None:
        """Free GPU memory held by the model (after a run or a cancel)."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def segment_file(path: str | Path, segmenter: Segmenter, settings: TileSettings | None = None,
                 progress: ProgressCallback | None = None) -> np.ndarray:
    from .io.images import read_image

    return segmenter.segment(read_image(path), settings, progress)


__all__ = ["Cancelled", "ImageReadError", "ImageSource", "InferenceMemoryError", "InferenceSettingsError",
           "PostprocessSettings", "RunReport", "Segmenter", "TileSettings", "gaussian_weights", "iter_blend",
           "iter_predict_probabilities", "predict_probabilities", "run_steps", "segment_file", "tile_starts"]
