"""Training data from a painted image: its tiles as labelled images, each tile its own group.

A validation split then holds out whole tiles that are never trained on (neighbouring tiles
are alike, so the scores are optimistic). The napari Train widget trains on layers this way.
"""

from __future__ import annotations

import numpy as np

from ..errors import MedsegError
from ..io.images import to_rgb_float
from .items import LabelledImage

DEFAULT_TILE = 256  # px: about one CoNSeP patch; whole tiles are held out for validation


class TileInputError(MedsegError, ValueError):
    """A painted image and its labels cannot be cut into training tiles (message is for the user)."""


def tile_bounds(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into ``round(length / tile)`` (at least 1) near-equal spans."""
    n = max(1, int(round(length / tile)))
    edges = np.linspace(0, length, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def check_painted_labels(image_shape: tuple, rgb: bool, labels: np.ndarray, num_classes: int) -> None:
    """Raise ``TileInputError`` unless ``labels`` are class ids of every pixel of the image."""
    spatial = image_shape[:-1] if rgb else image_shape
    if labels.shape != spatial:
        raise TileInputError(f"The labels have shape {labels.shape}, but the image's pixels are {spatial}; "
                             "choose a Labels layer painted on this image.")
    if len(spatial) not in (2, 3):
        raise TileInputError(f"Training takes a 2-D image or a stack of 2-D images; this one has shape {image_shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TileInputError(f"The labels are {labels.dtype}, not integer class ids.")
    low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
    if low < 0 or high >= num_classes:
        raise TileInputError(f"The labels hold class id {high if high >= num_classes else low}, but the model has "
                             f"{num_classes} classes (ids 0 to {num_classes - 1}).")
    if high == 0:
        raise TileInputError("The labels layer is empty (all background): paint some nuclei first.")


def layer_items(image: np.ndarray, rgb: bool, labels: np.ndarray, num_classes: int, in_channels: int, tile: int,
                name: str) -> tuple[list[LabelledImage], dict]:
    """Tiles of a painted image (or of each plane of a stack) as labelled images, one group per tile.

    Returns the items and, per item name, where it came from: ``(plane index or None, y0, y1, x0, x1)``.
    Raises ``TileInputError`` when the image and labels do not fit together or the labels do not
    fit the classes.
    """
    check_painted_labels(image.shape, rgb, labels, num_classes)
    stack = labels.ndim == 3
    items, regions = [], {}
    for p in range(labels.shape[0]) if stack else [None]:
        try:  # normalised over the whole plane, then cut
            pixels = to_rgb_float(np.asarray(image if p is None else image[p]), in_channels)
        except ValueError as exc:
            raise TileInputError(str(exc)) from exc
        plane_labels = labels if p is None else labels[p]
        for y0, y1 in tile_bounds(pixels.shape[0], tile):
            for x0, x1 in tile_bounds(pixels.shape[1], tile):
                item_name = f"{name}{'' if p is None else f'[{p}]'}[{y0}:{y1}, {x0}:{x1}]"
                items.append(LabelledImage(item_name, item_name, np.ascontiguousarray(pixels[y0:y1, x0:x1]),
                                           np.ascontiguousarray(plane_labels[y0:y1, x0:x1], dtype=np.uint8)))
                regions[item_name] = (p, y0, y1, x0, x1)
    return items, regions
