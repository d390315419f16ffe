"""Tiled prediction of images of any size, blended with a gaussian weight map.

Tiles overlap; each tile's softmax is weighted by a gaussian that is highest in the
tile centre, so every pixel is decided mostly by tiles that saw it with full context
(no seams at tile borders). The image is padded so any size works, normalised once
(never per tile), and the work is batched. ``progress(done, total)`` is called after
every batch and ``should_cancel()`` is polled before every batch; cancelling raises
``Cancelled`` and leaves nothing half-made.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from .devices import resolve_device
from .io.images import ImageReadError, to_rgb_float, validate_image_array
from .models import CheckpointMeta, load_checkpoint, resolve_model_path

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked to stop; no result was produced."""


class InferenceSettingsError(ValueError):
    """Tile size, overlap or batch size cannot work."""


@dataclass
class TileSettings:
    tile_size: int = 256
    overlap: int = 64
    batch_size: int = 4

    def checked(self, multiple_of: int) -> "TileSettings":
        if self.tile_size < multiple_of or self.tile_size % multiple_of:
            raise InferenceSettingsError(
                f"Tile size {self.tile_size} must be a positive multiple of {multiple_of} for this model."
            )
        if not 0 <= self.overlap < self.tile_size:
            raise InferenceSettingsError(f"Overlap {self.overlap} must be at least 0 and smaller than the tile ({self.tile_size}).")
        if self.batch_size < 1:
            raise InferenceSettingsError(f"Batch size must be at least 1, got {self.batch_size}.")
        return self


@functools.lru_cache(maxsize=8)
def gaussian_weights(tile_size: int, sigma_fraction: float = 0.125) -> np.ndarray:
    """2-D gaussian, 1 in the centre, floored so that border pixels still count a little."""
    coords = np.arange(tile_size, dtype=np.float64) - (tile_size - 1) / 2
    g = np.exp(-0.5 * (coords / (sigma_fraction * tile_size)) ** 2)
    w = np.outer(g, g)
    w = np.maximum(w / w.max(), 1e-3).astype(np.float32)
    w.setflags(write=False)  # cached and shared between runs: must stay read-only
    return w


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)``; the last tile is flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def iter_predict_probabilities(model: torch.nn.Module, image: np.ndarray, num_classes: int,
                               settings: TileSettings, device: torch.device) -> Generator[tuple[int, int], None, np.ndarray]:
    """Generator form: yields ``(tiles_done, tiles_total)`` after every batch and returns the
    blended class probabilities ``(C, H, W)`` float32 of a normalised ``(H, W, Cin)`` image.

    Stopping the generator between yields abandons the run (that is how cancelling works).
    """
    h, w = image.shape[:2]
    tile = settings.tile_size
    # Pad to at least one tile; 'symmetric' also works for 1-pixel images.
    ph, pw = max(0, tile - h), max(0, tile - w)
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric") if (ph or pw) else image
    H, W = padded.shape[:2]
    stride = tile - settings.overlap
    boxes = [(y, x) for y in tile_starts(H, tile, stride) for x in tile_starts(W, tile, stride)]
    weights = gaussian_weights(tile)
    weights_t = torch.tensor(weights, device=device)  # a copy: from_numpy warns on read-only arrays
    probs = np.zeros((num_classes, H, W), np.float32)
    norm = np.zeros((H, W), np.float32)
    model.eval()
    total = len(boxes)
    for first in range(0, total, settings.batch_size):
        batch_boxes = boxes[first:first + settings.batch_size]
        batch = np.stack([padded[y:y + tile, x:x + tile] for y, x in batch_boxes])
        with torch.inference_mode():
            x_t = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
            out = (torch.softmax(model(x_t).float(), dim=1) * weights_t).cpu().numpy()
        for (y, x), p in zip(batch_boxes, out):
            probs[:, y:y + tile, x:x + tile] += p
            norm[y:y + tile, x:x + tile] += weights
        yield min(first + settings.batch_size, total), total
    probs /= norm
    return probs[:, :h, :w]


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


def predict_probabilities(model: torch.nn.Module, image: np.ndarray, num_classes: int, settings: TileSettings,
                          device: torch.device, progress: ProgressCallback | None = None,
                          should_cancel: CancelCheck | None = None) -> np.ndarray:
    """Blended class probabilities ``(C, H, W)``; see ``iter_predict_probabilities``."""
    return run_steps(iter_predict_probabilities(model, image, num_classes, settings, device), progress, should_cancel)


class Segmenter:
    """A loaded model with its metadata: ``segment(image) -> uint8 class map``."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, device: torch.device):
        self.model, self.meta, self.device = model, meta, device

    @classmethod
    def load(cls, model: str | os.PathLike = "default", device: str = "auto") -> "Segmenter":
        dev = resolve_device(device)
        net, meta = load_checkpoint(resolve_model_path(str(model)), device=dev)
        return cls(net, meta, dev)

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def normalise(self, image: np.ndarray) -> np.ndarray:
        x = to_rgb_float(image, self.meta.model.in_channels)
        mean = np.asarray(self.meta.normalization.get("mean", [0.0]), np.float32)
        std = np.asarray(self.meta.normalization.get("std", [1.0]), np.float32)
        if mean.size not in (1, x.shape[-1]) or std.size not in (1, x.shape[-1]):
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return (x - mean) / std

    def iter_probabilities(self, image: np.ndarray, settings: TileSettings | None = None):
        """Generator: yields ``(done, total)`` tiles, returns probabilities ``(C, H, W)``."""
        settings = (settings or TileSettings()).checked(self.meta.model.output_stride)
        normalised = self.normalise(validate_image_array(image))
        return (yield from iter_predict_probabilities(self.model, normalised, len(self.classes), settings, self.device))

    def iter_segment(self, image: np.ndarray, settings: TileSettings | None = None):
        """Generator: yields ``(done, total)`` tiles, returns the uint8 class map."""
        probs = yield from self.iter_probabilities(image, settings)
        return probs.argmax(0).astype(np.uint8)

    def probabilities(self, image: np.ndarray, settings: TileSettings | None = None,
                      progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
        return run_steps(self.iter_probabilities(image, settings), progress, should_cancel)

    def segment(self, image: np.ndarray, settings: TileSettings | None = None,
                progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
        return run_steps(self.iter_segment(image, settings), progress, should_cancel)

    def release(self) -> None:
        """Free GPU memory held by the model (after a run or a cancel)."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def segment_file(path: str | Path, segmenter: Segmenter, settings: TileSettings | None = None,
                 progress: ProgressCallback | None = None) -> np.ndarray:
    from .io.images import read_image

    return segmenter.segment(read_image(path), settings, progress)


__all__ = ["Cancelled", "ImageReadError", "InferenceSettingsError", "Segmenter", "TileSettings", "gaussian_weights",
           "iter_predict_probabilities", "predict_probabilities", "run_steps", "segment_file", "tile_starts"]
