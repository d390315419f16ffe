"""Large TIFFs (whole slides, big tiles, pyramids) as lazy dask arrays: nothing is read until
a region is asked for, so napari shows them and the engine segments them strip by strip.

How a level is read depends on how it is stored, so that reading a band of rows costs about
that band in memory:

* tiled or finely stripped (compressed or not): tifffile's zarr store, which decodes only the
  tiles or strips a slice touches;
* uncompressed in one run of bytes (``tifffile.imwrite``'s default: one strip): the asked-for
  bytes, through a memory map opened and closed per read (the zarr store would read and copy
  the whole strip for every band, and a map kept open holds every page read so far);
* compressed in strips or tiles too big to decode per band (one strip for the whole plane):
  decoded once, whole.

A file whose header promises data it lacks is refused at opening (``images.check_tiff_data``),
and data that fails to decode later raises an ``ImageReadError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import (ImageReadError, InkLook, check_gray_samples, check_tiff_data, gray_with_alpha, image_suffix,
                     plane_layout, tifffile_quiet)

LAZY_MIN_PIXELS = 50_000_000  # above ~7000²: an eager read would take GBs and seconds
BAND_BYTES = 32 * 2**20  # rows per dask chunk of an uncompressed or decoded-once level
DECODE_ONCE_BYTES = 64 * 2**20  # a compressed strip or tile above this is decoded once, not per band
DECODE_ONCE_MAX = 8 * 2**30  # ... unless the whole level is larger: then per read, as slow as that is


def main_series_index(tif) -> int:
    """The series of an open ``tifffile.TiffFile`` that holds the image: the one with the largest
    full-resolution plane. Usually the first, but a Leica ``.scn`` lists its low-resolution macro
    (overview) image before the scan; label and macro images of ``.svs`` / ``.ndpi`` are smaller."""
    def plane(series) -> int:
        shape, axes = series.levels[0].shape, series.levels[0].axes
        return int(np.prod([n for n, a in zip(shape, axes) if a in "YX"]))

    sizes = [plane(series) for series in tif.series]
    return sizes.index(max(sizes)) if sizes else 0


def tiff_levels_info(path: str | os.PathLike) -> tuple[tuple[int, ...], str, int, np.dtype]:
    """``(shape, axes, number of pyramid levels, dtype)`` of a TIFF's main series
    (``main_series_index``), from its header."""
    import tifffile

    try:
        with tifffile_quiet(), tifffile.TiffFile(path) as tif:
            series = tif.series[main_series_index(tif)]
            check_tiff_data(series, Path(path))
            return tuple(series.shape), series.axes, len(series.levels), np.dtype(series.dtype)
    except ImageReadError:
        raise
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
    """Pyramid levels of a TIFF's main series (``main_series_index``) as dask arrays ``(Y, X[, C])``,
    full resolution first.

    The plane is found as for an eager read (``images.plane_layout``); RGBA keeps its alpha here,
    for display: whoever reads pixels for a model drops it.
    """
    path = Path(path)
    shape, axes, n_levels, dtype = tiff_levels_info(path)
    look, gray_alpha = _ink_look(path)
    if gray_alpha:  # gray + alpha: its gray, as an eager read gives it
        shape, axes = shape[:-1], axes[:-1]
    # the same plane rule as for eager reads, from the header; the axes keep z-stacks from passing as RGB
    layout = plane_layout(shape, dtype, f"'{path.name}'", axes=axes)
    levels = [_open_level(path, i, n_levels) for i in range(n_levels)]
    levels = [layout.to_channel_last(level[..., 0] if gray_alpha else level) for level in levels]
    if look.min_is_white:
        return [level.map_blocks(look.convert, dtype=level.dtype) for level in levels]
    if look.palette is not None and levels[0].ndim == 2:  # indices -> colours, on a new last axis
        return [level.map_blocks(look.convert, new_axis=2, chunks=level.chunks + ((3,),), dtype=look.palette.dtype)
                for level in levels]
    if look.cmyk and levels[0].ndim == 3:  # inks on the last axis, whole in every block
        return [level.rechunk({2: -1}).map_blocks(look.convert, chunks=level.chunks[:2] + ((3,),), dtype=level.dtype)
                for level in levels]
    return levels


def _ink_look(path: Path) -> tuple[InkLook, bool]:
    """How the main series' samples look, and whether they are gray + alpha (``gray_with_alpha``)."""
    import tifffile

    with tifffile_quiet(), tifffile.TiffFile(path) as tif:
        series = tif.series[main_series_index(tif)]
        check_gray_samples(series.keyframe, series.axes, f"'{path.name}'")
        return InkLook.of(series.keyframe), gray_with_alpha(series.keyframe, series.axes)


def _open_level(path: Path, index: int, n_levels: int):
    """One pyramid level as a dask array, read in the way its storage makes cheapest (module doc)."""
    import dask.array as da
    import tifffile

    try:
        with tifffile_quiet(), tifffile.TiffFile(path) as tif:
            series = main_series_index(tif)
            level = tif.series[series].levels[index]
            shape, axes, offset = tuple(level.shape), level.axes, level.dataoffset
            stored = np.dtype(level.dtype).newbyteorder(tif.byteorder)
            chunk_bytes = int(np.prod(level.keyframe.chunks)) * stored.itemsize
            once = offset is None and DECODE_ONCE_BYTES < chunk_bytes and level.nbytes <= DECODE_ONCE_MAX
            decoded = level.asarray() if once else None
    except Exception as exc:  # tifffile and its codecs raise many types for broken files
        raise _corrupt(path, exc) from exc
    band = _band_chunks(shape, axes, stored.itemsize)
    if decoded is not None:
        return da.from_array(decoded, chunks=band, name=False)
    if offset is not None:
        return _dask(_ContiguousData(path, offset, shape, stored), band)
    zarr_level = _zarr_level(path, series, index, n_levels)
    return _dask(_Guarded(zarr_level, path), zarr_level.chunks)


def _zarr_level(path: Path, series: int, index: int, n_levels: int):
    import tifffile
    import zarr

    try:
        root = zarr.open(tifffile.imread(path, aszarr=True, series=series), mode="r")
    except Exception as exc:
        raise ImageReadError(f"Cannot open '{path.name}' lazily ({type(exc).__name__}: {exc}).") from exc
    return root[str(index)] if n_levels > 1 else root


def _band_chunks(shape: tuple[int, ...], axes: str, itemsize: int) -> tuple[int, ...]:
    """Chunks of whole rows (every axis whole but Y), about ``BAND_BYTES`` each."""
    if "Y" not in axes:
        return shape
    y = axes.index("Y")
    row_bytes = int(np.prod(shape)) // max(shape[y], 1) * itemsize
    return tuple(max(1, BAND_BYTES // max(row_bytes, 1)) if i == y else n for i, n in enumerate(shape))


def _dask(source, chunks):
    import dask.array as da

    empty = np.empty((0,) * len(source.shape), source.dtype)  # its type: no read just to learn it
    return da.from_array(source, chunks=chunks, name=False, meta=empty)


def _corrupt(path: Path, exc: BaseException) -> ImageReadError:
    return ImageReadError(f"Cannot read '{path.name}': part of the file is corrupt or truncated and does not "
                          f"decode ({type(exc).__name__}: {exc}). Copy or export it again from the original.")


class _ContiguousData:
    """Uncompressed image data stored in one run of bytes, read through a memory map that is
    opened and closed for each read: the pages read leave the process with it."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], stored: np.dtype):
        self.path, self.offset, self.shape, self._stored = path, offset, shape, stored
        self.dtype, self.ndim = stored.newbyteorder("="), len(shape)

    def __getitem__(self, key) -> np.ndarray:
        mapped = np.memmap(self.path, self._stored, "r", self.offset, self.shape)
        try:
            return np.array(mapped[key], dtype=self.dtype)  # a copy, in native byte order
        finally:
            del mapped  # unmaps the file


class _Guarded:
    """A zarr level whose decoding errors (a tile cut short, bytes that do not inflate) become an
    ``ImageReadError`` naming the file, wherever the read happens (napari's drawing, a band of
    ``medseg predict``)."""

    def __init__(self, array, path: Path):
        self._array, self._path = array, path
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), array.ndim

    def __getitem__(self, key) -> np.ndarray:
        try:
            return np.asarray(self._array[key])
        except Exception as exc:  # tifffile, zarr and the codecs raise many types
            raise _corrupt(self._path, exc) from exc
