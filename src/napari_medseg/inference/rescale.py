"""Images at the model's pixel size: a model sees nuclei at the µm/px it was trained at.

A 20x slide (0.5 µm/px) shown to a 40x model (0.25 µm/px) has nuclei half the size the model
knows, and it misses or fragments them. When both pixel sizes are known, the image is resampled
to the model's pixel size block by block (each block with a halo of context, so memory stays
flat whatever the image's size), the network runs on each block, and its probabilities and
distance map are resampled back to the image's own grid before the class decision. Every
output therefore lines up with the image as given; only sizes measured in pixels (minimum
object and nucleus sizes, seed distances) are converted with ``settings_at_image_scale``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np

from ..errors import MedsegError
from ..nuclei.watershed import InstanceSettings
from ..steps import part_steps
from .class_decision import classify
from .run_report import RunReport
from .postprocess import PostprocessSettings
from .resize import resize_bilinear
from .source import ImageSource

# pixel sizes within 10 % of each other are taken as equal: resampling would only blur
SCALE_TOLERANCE = 0.10
# model pixels per image pixel at most: a 10x image (~1.0-1.1 µm/px) for a 40x model (0.25), its
# nuclei ~7 px across. Coarser images hold too few pixels a nucleus to cut, and enlarging them is
# slow: 20 (a magnification taken for µm/px) had enlarged a 512² crop 80-fold, hours of tiles
MAX_UPSCALE = 4.4
MODEL_BLOCK = 2048  # px per side of a block at the model's pixel size (~50 MB of RGB float32)
MODEL_HALO = 64  # px of context at the model's pixel size around each block, as slides use
PROGRESS_PER_BLOCK = 1000  # progress units per block: the bar and cancel move tile by tile


class PixelSizeError(MedsegError, ValueError):
    """A pixel size that cannot be a pixel size (not a finite number above 0)."""


def checked_pixel_size(value, name: str = "pixel size") -> float | None:
    """``value`` in µm/px as a float, ``None`` for unknown (``None`` or 0); an error otherwise."""
    if value is None:
        return None
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise PixelSizeError(f"The {name} must be a number of µm per pixel, got {value!r}.") from None
    if size == 0:
        return None
    if not math.isfinite(size) or size < 0:
        raise PixelSizeError(f"The {name} must be a finite number of µm per pixel above 0, got {value!r}.")
    return size


def model_scale(image_pixel_size_um, model_pixel_size_um) -> float:
    """Model pixels per image pixel: 2.0 for a 0.5 µm/px image and a 0.25 µm/px model; 1.0 when
    either size is unknown or they agree within ``SCALE_TOLERANCE``."""
    image_size = checked_pixel_size(image_pixel_size_um, "image's pixel size")
    model_size = checked_pixel_size(model_pixel_size_um, "model's pixel size")
    if image_size is None or model_size is None:
        return 1.0
    factor = image_size / model_size
    return 1.0 if abs(factor - 1.0) <= SCALE_TOLERANCE else factor


def resample(array: np.ndarray, shape: tuple[int, int], channels_last: bool = False) -> np.ndarray:
    """A float ``(C, H, W)`` (or ``(H, W, C)`` with ``channels_last``) array resampled to ``shape``:
    bilinear, averaged over the source pixels when shrinking (anti-aliased), float32. By torch
    where it is loaded (faster), else by ``resize`` (the same to float rounding), so a process
    that runs the network through an ONNX runtime never needs torch."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    planes = array.transpose(2, 0, 1) if channels_last else array
    if tuple(planes.shape[1:]) == tuple(shape):
        out = planes
    elif "torch" in sys.modules:
        out = _torch_resample(planes, shape)
    else:
        out = resize_bilinear(planes, shape)
    return np.ascontiguousarray(out.transpose(1, 2, 0) if channels_last else out)


def _torch_resample(planes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    shrinking = shape[0] < planes.shape[1] or shape[1] < planes.shape[2]
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(planes))[None], size=tuple(shape), mode="bilinear",
                         align_corners=False, antialias=shrinking)[0].numpy()


def settings_at_image_scale(factor: float, postprocess: PostprocessSettings | None = None,
                            instances: InstanceSettings | None = None):
    """``(postprocess, instances)`` with their pixel sizes (given at the model's pixel size, where
    their defaults were tuned) converted to the image's pixels: lengths / factor, areas / factor²."""
    if factor == 1.0:
        return postprocess, instances
    area = lambda px: max(0, round(px / factor ** 2)) if px > 1 else px  # noqa: E731  (0/1 mean "off")
    if postprocess is not None:
        postprocess = replace(postprocess, min_object_size=area(postprocess.min_object_size),
                              max_hole_size=area(postprocess.max_hole_size))
    if instances is not None:
        instances = replace(instances, min_distance=max(1, round(instances.min_distance / factor)),
                            sigma=instances.sigma / factor, min_size=area(instances.min_size),
                            min_marker_size=area(instances.min_marker_size))
    return postprocess, instances


def block_windows(height: int, width: int, factor: float) -> list[tuple[tuple[int, int, int, int], tuple[int, ...]]]:
    """``(block, window)`` pairs in image pixels: blocks of ``MODEL_BLOCK`` model px tiling the
    image, each inside a window grown by ``MODEL_HALO`` model px (clipped to the image). On an
    image finer than the model a block is ``MODEL_BLOCK`` image px instead: its window and the
    probabilities brought back to it are held in float32 at image resolution (a 4x finer image
    had one 8192² block: 1.5 GB)."""
    step = max(16, int(MODEL_BLOCK / max(factor, 1.0)))
    halo = max(8, math.ceil(MODEL_HALO / factor))
    pairs = []
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            y1, x1 = min(height, y0 + step), min(width, x0 + step)
            window = (max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo))
            pairs.append(((y0, y1, x0, x1), window))
    return pairs


def iter_segment_rescaled(segmenter, source: ImageSource, factor: float, settings, out,
                          probabilities_out=None, distance_out=None):
    """Generator: yields ``(done, total)``; writes the class map into ``out`` (image-sized) and
    returns it. Each block is resampled to the model's pixel size, segmented there by
    ``segmenter.iter_segment`` (no pixel size: the native path), and its probabilities and
    distance map resampled back to the block's own pixels, where the class is decided. ``factor``:
    network px per image px (the pixel-size scale times the network zoom); the caller says why."""
    n = len(segmenter.classes)
    pairs = block_windows(source.height, source.width, factor)
    total, report = len(pairs) * PROGRESS_PER_BLOCK, RunReport()
    for index, ((y0, y1, x0, x1), (wy0, wy1, wx0, wx1)) in enumerate(pairs):
        pixels = source.window01(wy0, wy1, wx0, wx1)
        shape = (wy1 - wy0, wx1 - wx0)
        scaled_shape = (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor)))
        scaled = np.clip(resample(pixels, scaled_shape, channels_last=True), 0.0, 1.0)  # no float overshoot
        probabilities = np.zeros((n, *scaled_shape), np.float32)
        distance = np.zeros(scaled_shape, np.float32) if distance_out is not None else None
        steps = segmenter.iter_segment(ImageSource(scaled, source.channels), settings,
                                       probabilities_out=probabilities, distance_out=distance)
        yield from part_steps(steps, index, PROGRESS_PER_BLOCK, total)
        _add_report(report, segmenter.last_report)
        core = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
        probabilities = resample(probabilities, shape)[(slice(None), *core)]
        out[y0:y1, x0:x1] = classify(probabilities, segmenter.foreground_threshold, segmenter.class_weights)
        if probabilities_out is not None:
            probabilities_out[:, y0:y1, x0:x1] = probabilities
        if distance_out is not None:
            distance_out[y0:y1, x0:x1] = resample(distance[None], shape)[0][core]
        yield (index + 1) * PROGRESS_PER_BLOCK, total
    segmenter.last_report = report
    return out


def _add_report(total: RunReport, block: RunReport) -> None:
    total.tiles += block.tiles
    total.skipped_background += block.skipped_background
    total.forward_passes += block.forward_passes
    total.batch_size = block.batch_size
    total.out_of_memory_retries += block.out_of_memory_retries
    total.backend, total.precision = block.backend, block.precision
    total.notes.extend(note for note in block.notes if note not in total.notes)

