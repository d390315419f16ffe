"""Large TIFFs (whole slides, big tiles, pyramids) as lazy dask arrays: nothing is read until
a region is asked for, so napari shows them and the engine segments them strip by strip.

tifffile exposes the file as a zarr store (only the tiles or strips a slice touches are
decoded); dask wraps it so napari and the engine see an ordinary array.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import ImageReadError, image_suffix, plane_layout

LAZY_MIN_PIXELS = 50_000_000  # above ~7000²: an eager read would take GBs and seconds


def tiff_levels_info(path: str | os.PathLike) -> tuple[tuple[int, ...], str, int, np.dtype]:
    """``(shape, axes, number of pyramid levels, dtype)`` of a TIFF's first series, from its header."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), series.axes, len(series.levels), np.dtype(series.dtype)
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageReadError(f"Cannot read '{Path(path).name}': not a readable TIFF ({type(exc).__name__}: {exc}).") from exc


def should_open_lazily(path: str | os.PathLike, min_pixels: int = LAZY_MIN_PIXELS) -> bool:
    """TIFFs with a pyramid or with more than ``min_pixels`` pixels per plane."""
    if image_suffix(path) not in (".tif", ".tiff") or not Path(path).is_file():
        return False
    try:
        shape, axes, levels, _ = tiff_levels_info(path)
    except ImageReadError:
        return False  # the eager reader says what is wrong with the file
    plane = 1
    for size, axis in zip(shape, axes):
        if axis in "YX":
            plane *= size
    return levels > 1 or plane > min_pixels


def open_tiff_lazy(path: str | os.PathLike) -> list:
    """Pyramid levels of a TIFF's first series as dask arrays ``(Y, X[, C])``, full resolution first.

    The plane is found as for an eager read (``images.plane_layout``); RGBA keeps its alpha here,
    for display: whoever reads pixels for a model drops it.
    """
    import dask.array as da
    import tifffile
    import zarr

    path = Path(path)
    shape, axes, n_levels, dtype = tiff_levels_info(path)
    # the same plane rule as for eager reads, from the header; the axes keep z-stacks from passing as RGB
    layout = plane_layout(shape, dtype, f"'{path.name}'", axes=axes)
    try:
        store = tifffile.imread(path, aszarr=True)
        root = zarr.open(store, mode="r")
    except Exception as exc:
        raise ImageReadError(f"Cannot open '{path.name}' lazily ({type(exc).__name__}: {exc}).") from exc
    arrays = [root[str(i)] for i in range(n_levels)] if n_levels > 1 else [root]
    return [layout.to_channel_last(da.from_zarr(a)) for a in arrays]
