"""How an image is cut into overlapping tiles (windows), and how tile predictions are weighted.

Every pixel's prediction is a weighted mean over the tiles that cover it; the weight map
is highest in a tile's centre, so each pixel is decided mostly by the tiles that saw it with
the most context. That is what removes seams at tile borders.
"""

from __future__ import annotations

import functools

import numpy as np

from .settings import BLENDS, InferenceSettingsError


@functools.lru_cache(maxsize=8)
def gaussian_weights(tile_size: int, sigma_fraction: float = 0.125) -> np.ndarray:
    """2-D gaussian, 1 in the centre, floored so that border pixels still count a little."""
    coords = np.arange(tile_size, dtype=np.float64) - (tile_size - 1) / 2
    g = np.exp(-0.5 * (coords / (sigma_fraction * tile_size)) ** 2)
    w = np.outer(g, g)
    w = np.maximum(w / w.max(), 1e-3).astype(np.float32)
    w.setflags(write=False)  # cached and shared between runs: must stay read-only
    return w


@functools.lru_cache(maxsize=8)
def cosine_weights(tile_size: int) -> np.ndarray:
    """Separable raised-cosine (Hann) taper, floored like the gaussian; flatter in the centre."""
    t = (np.arange(tile_size, dtype=np.float64) + 0.5) / tile_size
    c = np.sin(np.pi * t) ** 2
    w = np.outer(c, c)
    w = np.maximum(w / w.max(), 1e-3).astype(np.float32)
    w.setflags(write=False)
    return w


def blend_weights(tile_size: int, blend: str = "gaussian") -> np.ndarray:
    if blend == "gaussian":
        return gaussian_weights(tile_size)
    if blend == "cosine":
        return cosine_weights(tile_size)
    raise InferenceSettingsError(f"Unknown blend '{blend}'; choose one of: {', '.join(BLENDS)}.")


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)``; the last tile is flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def glass_fraction(tile01: np.ndarray, level: float) -> float:
    """Share of pixels of an RGB tile in ``[0, 1]`` whose every channel is at least ``level``."""
    return float((tile01.min(axis=-1) >= level).mean())
