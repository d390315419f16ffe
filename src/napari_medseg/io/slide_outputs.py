"""Whole-slide results on disk, written piece by piece: label pyramids (zarr, OME-TIFF),
QuPath GeoJSON in slide coordinates and per-nucleus CSV rows.

A result store is a zarr group with one multiscale group per map (``classes``, ``instances``;
``<name>/0`` full resolution, each next level half the size, nearest-neighbour) and the OME-NGFF
``multiscales`` attributes, so napari and OME-Zarr viewers open it as a pyramid aligned with the
slide. Nothing here holds more than one block of a map in memory.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .geojson import instances_to_geojson
from .outputs import temp_path, write_error
from .tables import csv_row

CHUNK = 1024
PYRAMID_MIN_SIDE = 512  # the coarsest level is the first whose longer side is at most this


def create_result_store(path: str | os.PathLike, shape: tuple[int, int], names: dict[str, str],
                        chunk: int = CHUNK, pixel_size_um: float | None = None):
    """A new zarr group at ``path`` with a full-resolution array ``<name>/0`` per ``names``
    entry (``{"classes": "uint8", "instances": "int32", ...}``), zeros until written."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="w")
    except OSError as exc:
        raise write_error(Path(path), exc) from None
    root.attrs["pixel_size_um"] = pixel_size_um
    for name, dtype in names.items():
        root.create_group(name).create_array("0", shape=shape, chunks=(chunk, chunk), dtype=dtype, fill_value=0)
    return root


def build_pyramid(group, min_side: int = PYRAMID_MIN_SIDE, pixel_size_um: float | None = None,
                  block: int = 4 * CHUNK) -> int:
    """Add levels ``1, 2, ...`` to a multiscale group (each half the last, nearest-neighbour),
    block by block, and its OME-NGFF ``multiscales`` metadata; returns the number of levels."""
    level = 0
    while max(group[str(level)].shape) > min_side:
        source = group[str(level)]
        height, width = (s // 2 for s in source.shape)
        target = group.create_array(str(level + 1), shape=(height, width), chunks=source.chunks,
                                    dtype=source.dtype, fill_value=0)
        for y in range(0, height, block // 2):
            for x in range(0, width, block // 2):
                part = np.asarray(source[2 * y:2 * (y + block // 2), 2 * x:2 * (x + block // 2)])[::2, ::2]
                target[y:y + part.shape[0], x:x + part.shape[1]] = part[:height - y, :width - x]
        level += 1
    size = pixel_size_um or 1.0
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [size * 2**i] * 2}]}
                     for i in range(level + 1)],
    }]
    return level + 1


def pyramid_levels(group) -> list:
    """The levels of a multiscale group, full resolution first."""
    levels = []
    while str(len(levels)) in group:
        levels.append(group[str(len(levels))])
    return levels


def write_pyramid_tiff(path: str | os.PathLike, group, pixel_size_um: float | None = None, tile: int = 512) -> Path:
    """A multiscale group as a tiled, compressed pyramidal OME-TIFF (levels as SubIFDs), tile by tile;
    QuPath and napari open it as a label pyramid aligned with the slide."""
    import tifffile

    levels = pyramid_levels(group)
    path = Path(path)
    metadata = {"axes": "YX"}
    if pixel_size_um:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeY=pixel_size_um,
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    tmp = temp_path(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            for i, level in enumerate(levels):
                extra = {"subifds": len(levels) - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
                tw.write(_tiles(level, tile), shape=level.shape, dtype=level.dtype, tile=(tile, tile),
                         compression="zlib", **extra)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    return path


def _tiles(array, tile: int):
    """Tiles of a 2-D array in TIFF order (row by row), padded to full tiles."""
    height, width = array.shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            part = np.asarray(array[y:y + tile, x:x + tile])
            yield np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))


class _StreamedFile:
    """A file written piece by piece under a hidden temp name, renamed when complete."""

    def close(self) -> Path:
        self._finish()
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the half-written file (a cancelled run leaves nothing behind)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def _finish(self) -> None:
        """What the file needs at its end."""


class GeoJSONStream(_StreamedFile):
    """A QuPath GeoJSON FeatureCollection written nucleus block by nucleus block, in slide
    coordinates (level-0 px): each block's outlines shifted by its offset and scaled by ``scale``."""

    def __init__(self, path: str | os.PathLike, class_names: list[str] | None = None, colors: list | None = None,
                 scale: float = 1.0):
        self.path, self.class_names, self.colors, self.scale = Path(path), class_names, colors, scale
        self._tmp = temp_path(self.path)
        self._file = _open_for_writing(self.path, self._tmp)
        self._file.write('{"type": "FeatureCollection", "features": [\n')
        self._first, self.count = True, 0

    def add(self, instances: np.ndarray, classes: dict[int, int] | None, top: int, left: int) -> None:
        """The nuclei of ``instances`` (a window whose corner is at slide ``(top, left)``)."""
        features = instances_to_geojson(instances, classes, self.class_names, self.colors)["features"]
        for feature in features:
            ring = feature["geometry"]["coordinates"][0]
            feature["geometry"]["coordinates"][0] = [[(x + left) * self.scale, (y + top) * self.scale] for x, y in ring]
            self._file.write(("" if self._first else ",\n") + json.dumps(feature))
            self._first = False
        self.count += len(features)

    def _finish(self) -> None:
        self._file.write("\n]}\n")


class CSVStream(_StreamedFile):
    """Rows of a table (dict of equal-length columns) appended block by block, formatted as ``tables.write_csv``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = temp_path(self.path)
        self._file = _open_for_writing(self.path, self._tmp, newline="")
        self._writer, self._names, self.count = csv.writer(self._file), None, 0

    def add(self, columns: dict[str, np.ndarray]) -> None:
        if self._names is None:
            self._names = list(columns)
            self._writer.writerow(self._names)
        for row in zip(*(columns[n] for n in self._names)):
            self._writer.writerow(csv_row(row))
            self.count += 1


def _open_for_writing(path: Path, tmp: Path, **kwargs):
    """``tmp`` opened for writing; an error names ``path``, the file the user asked for."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(tmp, "w", **kwargs)
    except OSError as exc:
        raise write_error(path, exc) from None
