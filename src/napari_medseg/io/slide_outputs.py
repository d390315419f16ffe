"""Whole-slide results on disk, written piece by piece: label pyramids (zarr, OME-TIFF),
QuPath GeoJSON in slide coordinates and per-nucleus CSV rows.

A result store is a zarr group with one multiscale group per map (``classes``, ``instances``;
``<name>/0`` full resolution, each next level half the size, nearest-neighbour) and the OME-NGFF
``multiscales`` attributes, so napari and OME-Zarr viewers open it as a pyramid aligned with the
slide. Nothing here holds more than one block of a map in memory.

A run's files are written under hidden temp names and renamed together when it completes
(``SlideResultFiles``): results are never overwritten, and a cancelled run leaves nothing. The
long writes are step generators with a step per block or row of tiles, so a cancel lands soon.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np

from .geojson import instances_to_geojson, map_geometry
from .images import LABEL_RECORD_KEY
from .outputs import OutputFolderError, remove_stale_temps, temp_path, write_error
from .tables import csv_row

CHUNK = 1024
PYRAMID_MIN_SIDE = 512  # the coarsest level is the first whose longer side is at most this
# what one slide run writes, by kind: ``<stem><suffix>`` in the output folder
RESULT_SUFFIXES = {"store": ".zarr", "classes_tiff": "_labels.ome.tif", "instances_tiff": "_instances.ome.tif",
                   "geojson": "_nuclei.geojson", "csv": "_nuclei.csv"}
TIFF_QUEUE_TILES = 16  # tiles read ahead of the TIFF writer thread (16 MB of int32 at most)


def check_no_slide_results(out_dir: str | os.PathLike, stem: str, flag: str = "--out") -> None:
    """Refuses a folder that already holds results of a slide named ``stem``: a new run would
    replace them (results are never overwritten; choose another folder)."""
    out_dir = Path(out_dir)
    held = [out_dir / (stem + suffix) for suffix in RESULT_SUFFIXES.values() if (out_dir / (stem + suffix)).exists()]
    if held:
        raise OutputFolderError(
            f"{flag} {out_dir} already holds results of '{stem}' ({', '.join(p.name for p in held)}): a new run "
            "would replace them. Choose another output folder, or move those files away first. Nothing was written.")


def fresh_results_folder(base: str | os.PathLike, name: str) -> Path:
    """``base/name``, or ``name-2``, ``name-3``, ... : the first that does not exist yet (a default
    output folder never receives a second run)."""
    folder, n = Path(base) / name, 2
    while folder.exists():
        folder, n = Path(base) / f"{name}-{n}", n + 1
    return folder


class SlideResultFiles:
    """The files of one slide run in ``out_dir``, each written under a hidden temp name (``temp``)
    and all renamed at the end (``commit``): a cancelled or failed run leaves none (``abort``),
    and a folder that already holds this slide's results is refused before any work."""

    def __init__(self, out_dir: str | os.PathLike, stem: str, flag: str = "--out"):
        self.out_dir, self.stem, self.flag = Path(out_dir), stem, flag
        check_no_slide_results(self.out_dir, stem, flag)
        self._made = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]  # removed again by abort
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.out_dir, exc) from None
        remove_stale_temps(self.out_dir)
        self._temps: dict[str, Path] = {}

    def path(self, kind: str) -> Path:
        return self.out_dir / (self.stem + RESULT_SUFFIXES[kind])

    def temp(self, kind: str) -> Path:
        """Where ``kind`` (a key of ``RESULT_SUFFIXES``) is written until ``commit``."""
        self._temps[kind] = temp_path(self.path(kind))
        return self._temps[kind]

    def commit(self) -> dict[str, Path]:
        """Renames every written file to its name; returns them by kind. All or none: if one
        rename fails, those done are moved back to their temp names (``abort`` then removes them),
        so a folder never holds part of a run beside nothing to say it is partial."""
        check_no_slide_results(self.out_dir, self.stem, self.flag)  # another run may have finished meanwhile
        renamed: list[str] = []
        try:
            for kind, tmp in self._temps.items():
                os.replace(tmp, self.path(kind))
                renamed.append(kind)
        except OSError as exc:
            for done in reversed(renamed):
                try:
                    os.replace(self.path(done), self._temps[done])
                except OSError:
                    pass  # nothing better to do: the error below names the file that failed
            raise write_error(self.path(kind), exc) from None
        return {kind: self.path(kind) for kind in self._temps}

    def abort(self) -> None:
        """Removes every file written so far (the zarr store is a folder), and the folders the run
        made if nothing else went into them: a cancelled run's default folder had stayed, empty,
        and sent the next run to ``<name>-2``."""
        for tmp in self._temps.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        for folder in self._made:  # deepest first
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break


def create_result_store(path: str | os.PathLike, shape: tuple[int, int], names: dict[str, str],
                        chunk: int = CHUNK, pixel_size_um: float | None = None, classes: dict | None = None,
                        shown_as: str | os.PathLike | None = None):
    """A new zarr group at ``path`` with a full-resolution array ``<name>/0`` per ``names``
    entry (``{"classes": "uint8", "instances": "int32", ...}``), zeros until written; ``classes``
    (``{"classes": names, "colors": ...}``) recorded in its attributes. An existing store is never
    replaced. ``shown_as``: the path errors name (the store's final name, where ``path`` is its
    hidden temp name)."""
    import zarr

    path = Path(path)
    shown = Path(shown_as) if shown_as is not None else path
    if path.exists():
        raise OutputFolderError(f"{shown} exists: results are never overwritten. Choose another output folder.")
    try:
        # Zarr v2: OME-NGFF 0.4, which viewers and validators read, is defined on it (v3 needs 0.5)
        root = zarr.open_group(str(path), mode="w-", zarr_format=2)
        root.attrs["pixel_size_um"] = pixel_size_um
        if classes:
            root.attrs[LABEL_RECORD_KEY] = classes
        for name, dtype in names.items():
            root.create_group(name).create_array("0", shape=shape, chunks=(chunk, chunk), dtype=dtype, fill_value=0)
    except OSError as exc:  # a full disk or a folder gone: its metadata files are written here too
        raise write_error(shown, exc) from None
    return root


def recorded_classes(path: str | os.PathLike) -> dict | None:
    """``{"classes": [...], "colors": [...]}`` a slide run recorded in its class map's OME-TIFF
    (``iter_write_pyramid_tiff``), or ``None`` for any other file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome:
                return None
            image = tifffile.xml2dict(tif.ome_metadata or "").get("OME", {}).get("Image", {})
        image = image[0] if isinstance(image, list) else image
        record = json.loads(image.get("Description", "") or "{}").get(LABEL_RECORD_KEY)
    except (OSError, ValueError, AttributeError, tifffile.TiffFileError):
        return None
    names = record.get("classes") if isinstance(record, dict) else None
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        return None
    colors = record.get("colors")
    return {"classes": names, "colors": colors if isinstance(colors, list) and len(colors) == len(names) else None}


def pyramid_shapes(shape: tuple[int, int], min_side: int = PYRAMID_MIN_SIDE) -> list[tuple[int, int]]:
    """The level shapes of a label pyramid over ``shape``: each half the last, down to ``min_side``."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > min_side:
        shapes.append(tuple(max(1, s // 2) for s in shapes[-1]))
    return shapes


def _grid(shape: tuple[int, int], step_y: int, step_x: int) -> list[tuple[int, int]]:
    return [(y, x) for y in range(0, shape[0], step_y) for x in range(0, shape[1], step_x)]


def _meets(bounds: tuple[int, int, int, int] | None, y: int, x: int, height: int, width: int, scale: int) -> bool:
    """Whether the ``height x width`` piece at ``(y, x)`` of a level ``scale`` times smaller than
    level 0 meets ``bounds`` (level-0 ``y0, y1, x0, x1``; None: everything)."""
    if bounds is None:
        return True
    y0, y1, x0, x1 = bounds
    return y * scale < y1 and (y + height) * scale > y0 and x * scale < x1 and (x + width) * scale > x0


def pyramid_steps(shape: tuple[int, int], min_side: int = PYRAMID_MIN_SIDE, block: int = 2 * CHUNK,
                  bounds: tuple[int, int, int, int] | None = None) -> int:
    """How many steps ``iter_build_pyramid`` takes for a map of ``shape`` written within ``bounds``."""
    return sum(len(_pyramid_blocks(level, 2 ** (i + 1), block, bounds))
               for i, level in enumerate(pyramid_shapes(shape, min_side)[1:]))


def _pyramid_blocks(shape: tuple[int, int], scale: int, block: int, bounds) -> list[tuple[int, int]]:
    """The blocks of a level (``scale`` level-0 px a pixel) that hold something of ``bounds``."""
    step = block // 2
    return [(y, x) for y, x in _grid(shape, step, step) if _meets(bounds, y, x, step, step, scale)]


def iter_build_pyramid(group, min_side: int = PYRAMID_MIN_SIDE, pixel_size_um: float | None = None,
                       block: int = 2 * CHUNK, bounds: tuple[int, int, int, int] | None = None):
    """Generator: adds levels ``1, 2, ...`` to a multiscale group (each half the last,
    nearest-neighbour), one ``block``-sized piece of the level above per step (a cancel lands
    within a piece), then its OME-NGFF ``multiscales`` metadata; returns the number of levels.
    ``bounds`` (level-0 ``y0, y1, x0, x1``): where level 0 was written; elsewhere stays zeros unread."""
    shapes = pyramid_shapes(group["0"].shape, min_side)
    total, done = pyramid_steps(shapes[0], min_side, block, bounds), 0
    for level, (height, width) in enumerate(shapes[1:]):
        source = group[str(level)]
        target = group.create_array(str(level + 1), shape=(height, width), chunks=source.chunks,
                                    dtype=source.dtype, fill_value=0)
        for y, x in _pyramid_blocks((height, width), 2 ** (level + 1), block, bounds):
            part = np.asarray(source[2 * y:2 * (y + block // 2), 2 * x:2 * (x + block // 2)])[::2, ::2]
            target[y:y + part.shape[0], x:x + part.shape[1]] = part[:height - y, :width - x]
            done += 1
            yield done, total
    size = pixel_size_um or 1.0
    # without a known pixel size the scale is in slide pixels and no unit is claimed (a viewer
    # would otherwise measure a 0.25 µm/px slide's nuclei 16x too large)
    unit = {"unit": "micrometer"} if pixel_size_um else {}
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [size * 2**i] * 2}]}
                     for i in range(len(shapes))],
    }]
    return len(shapes)


def pyramid_levels(group) -> list:
    """The levels of a multiscale group, full resolution first."""
    levels = []
    while str(len(levels)) in group:
        levels.append(group[str(len(levels))])
    return levels


def _tiff_spans(shape: tuple[int, int], chunk_width: int, tile: int) -> list[tuple[int, int]]:
    """The ``(y, x)`` corners of the pieces a level is read in: one tile row high, a whole number
    of tiles about a chunk wide (so each piece decodes one chunk row once)."""
    return _grid(shape, tile, max(tile, chunk_width // tile * tile))


def tiff_steps(shapes: list[tuple[int, int]], chunk_width: int = CHUNK, tile: int = 512) -> int:
    """How many steps ``iter_write_pyramid_tiff`` takes for levels of ``shapes``."""
    return sum(len(_tiff_spans(shape, chunk_width, tile)) for shape in shapes)


def iter_write_pyramid_tiff(file: str | os.PathLike, group, pixel_size_um: float | None = None, tile: int = 512,
                            named: str | os.PathLike | None = None, bounds: tuple[int, int, int, int] | None = None,
                            classes: dict | None = None):
    """Generator: a multiscale group as a tiled, compressed pyramidal OME-TIFF at ``file``
    (levels as SubIFDs; QuPath and napari open it as a label pyramid aligned with the slide),
    one chunk-wide row of tiles per step; returns ``file``. tifffile compresses and writes in a
    thread of its own, fed tiles through a short queue, so a cancel lands within a step; a
    cancelled or failed write removes ``file``. Errors name ``named`` (the file the user sees).
    ``bounds`` (level-0 ``y0, y1, x0, x1``): where the maps were written; elsewhere is zeros, not read.
    ``classes`` (a class map's names and colours) goes in the OME image's Description, as JSON
    (``recorded_classes`` reads it: a rare class absent from the coarse levels is still named)."""
    levels, file = pyramid_levels(group), Path(file)
    chunk_width = levels[0].chunks[1]
    total, done = tiff_steps([lv.shape for lv in levels], chunk_width, tile), 0
    feed = _TileFeed()
    writer = threading.Thread(target=_write_tiff_levels, args=(file, levels, pixel_size_um, tile, feed, classes),
                              daemon=True)
    writer.start()
    try:
        for index, level in enumerate(levels):
            span = max(tile, chunk_width // tile * tile)
            for y, x in _tiff_spans(level.shape, chunk_width, tile):
                if not _meets(bounds, y, x, tile, span, 2 ** index):
                    # outside what was written: zeros, whose bytes the writer has made once. Nothing
                    # made here (a 512² region of a 40960² slide: 8539 tiles, 2.3 s -> 0.21 s a map)
                    for _ in range(0, min(span, level.shape[1] - x), tile):
                        feed.put(None, writer)
                    done += 1
                    yield done, total
                    continue
                part = np.asarray(level[y:y + tile, x:x + span])
                for left in range(0, part.shape[1], tile):
                    piece = part[:, left:left + tile]
                    feed.put(np.pad(piece, ((0, tile - piece.shape[0]), (0, tile - piece.shape[1]))), writer)
                done += 1
                yield done, total
        feed.finish(writer)
    except BaseException as exc:
        feed.stop(writer)
        file.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(Path(named or file), exc) from None
        raise
    return file


def _write_tiff_levels(file: Path, levels: list, pixel_size_um: float | None, tile: int, feed: "_TileFeed",
                       classes: dict | None = None) -> None:
    """The TIFF writer thread: each level's tiles, as ``feed`` hands them over."""
    import tifffile

    metadata = {"axes": "YX", **({"Description": json.dumps({LABEL_RECORD_KEY: classes})} if classes else {})}
    if pixel_size_um:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeY=pixel_size_um,
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    try:
        with tifffile.TiffWriter(file, bigtiff=True, ome=True) as tw:
            for i, level in enumerate(levels):
                extra = {"subifds": len(levels) - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
                count = len(_grid(level.shape, tile, tile))
                tw.write(_zlib_tiles(feed.tiles(count), (tile, tile), level.dtype), shape=level.shape,
                         dtype=level.dtype, tile=(tile, tile), compression="zlib", **extra)
    except BaseException as exc:  # handed to the generator, which raises it in its own thread
        feed.error = exc


def _zlib_tiles(tiles, shape: tuple[int, int], dtype):
    """Tiles as the zlib bytes tifffile writes as they are: an empty tile's (``None``, or all zeros)
    made once per level (a small region of a 40960² slide had spent 28 s of 29 compressing the
    zeros of every level), the others compressed here, in the writer thread, as tifffile would."""
    import imagecodecs

    empty = None
    for tile in tiles:
        if tile is None or not tile.any():
            if empty is None:
                empty = imagecodecs.zlib_encode(np.zeros(shape, dtype))
            yield empty
        else:
            yield imagecodecs.zlib_encode(np.ascontiguousarray(tile))


class _WriteStopped(Exception):
    """Raised inside tifffile's tile loop when the write is abandoned."""


class _TileFeed:
    """Tiles handed from the step generator to the TIFF writer thread; bounded, so memory stays flat."""

    _STOP = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(TIFF_QUEUE_TILES)
        self.error: BaseException | None = None

    def tiles(self, count: int):
        """In the writer thread: the next ``count`` tiles."""
        for _ in range(count):
            tile = self.queue.get()
            if tile is self._STOP:
                raise _WriteStopped
            yield tile

    def put(self, tile: np.ndarray, writer: threading.Thread) -> None:
        while True:
            self._raise_error()
            try:
                self.queue.put(tile, timeout=0.1)
                return
            except queue.Full:
                if not writer.is_alive():
                    self._raise_error()
                    raise RuntimeError("the TIFF writer thread stopped early")

    def finish(self, writer: threading.Thread) -> None:
        writer.join()
        self._raise_error()

    def stop(self, writer: threading.Thread) -> None:
        """Abandon the write: the writer's next tile request raises, and it closes the file."""
        while writer.is_alive():
            try:
                self.queue.get_nowait()  # room for the stop mark
            except queue.Empty:
                pass
            try:
                self.queue.put_nowait(self._STOP)
            except queue.Full:
                continue
            writer.join(timeout=0.5)

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class _StreamedFile:
    """A file written piece by piece at ``file`` (a temp name, see ``SlideResultFiles``); errors
    name ``path``, the file the user asked for."""

    def __init__(self, path: str | os.PathLike, file: str | os.PathLike | None = None, **open_kwargs):
        self.path = Path(path)
        self.file = Path(file) if file is not None else temp_path(self.path)
        self._file = _open_for_writing(self.path, self.file, **open_kwargs)

    def close(self) -> Path:
        """Completes and closes the file; returns where it is (its owner renames it)."""
        self._finish()
        self._file.close()
        return self.file

    def abort(self) -> None:
        """Drop the half-written file (a cancelled run leaves nothing behind)."""
        self._file.close()
        self.file.unlink(missing_ok=True)

    def _finish(self) -> None:
        """What the file needs at its end."""


class GeoJSONStream(_StreamedFile):
    """A QuPath GeoJSON FeatureCollection written nucleus block by nucleus block, in slide
    coordinates (level-0 px): each block's outlines shifted by its offset and scaled by ``scale``."""

    def __init__(self, path: str | os.PathLike, class_names: list[str] | None = None, colors: list | None = None,
                 scale: float = 1.0, file: str | os.PathLike | None = None):
        super().__init__(path, file)
        self.class_names, self.colors, self.scale = class_names, colors, scale
        self._run = uuid.uuid4()  # feature ids unique to this file, one id per nucleus over all blocks
        self._file.write('{"type": "FeatureCollection", "features": [\n')
        self._first, self.count = True, 0

    def add(self, instances: np.ndarray, classes: dict[int, int] | None, top: int, left: int) -> None:
        """The nuclei of ``instances`` (a window whose corner is at slide ``(top, left)``)."""
        features = instances_to_geojson(instances, classes, self.class_names, self.colors, run=self._run)["features"]
        for feature in features:
            feature["geometry"] = map_geometry(feature["geometry"],
                                               lambda x, y: ((x + left) * self.scale, (y + top) * self.scale))
            self._file.write(("" if self._first else ",\n") + json.dumps(feature))
            self._first = False
        self.count += len(features)

    def _finish(self) -> None:
        self._file.write("\n]}\n")


class CSVStream(_StreamedFile):
    """Rows of a table (dict of equal-length columns) appended block by block, formatted as ``tables.write_csv``."""

    def __init__(self, path: str | os.PathLike, file: str | os.PathLike | None = None):
        super().__init__(path, file, newline="")
        self._writer, self._names, self.count = csv.writer(self._file), None, 0

    def add(self, columns: dict[str, np.ndarray]) -> None:
        if self._names is None:
            self._names = list(columns)
            self._writer.writerow(self._names)
        for row in zip(*(columns[n] for n in self._names)):
            self._writer.writerow(csv_row(row))
            self.count += 1


def read_nucleus_classes(path: str | os.PathLike, max_id: int) -> np.ndarray | None:
    """``[id] -> class index`` from a per-nucleus table written by ``CSVStream`` (columns ``label``
    and ``class_id``); ``None`` if it has no class column, no row, or an id above ``max_id``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "label" not in header or "class_id" not in header:
            return None
        id_col, class_col = header.index("label"), header.index("class_id")
        rows = np.array([(int(r[id_col]), int(r[class_col])) for r in reader], np.int64).reshape(-1, 2)
    if not len(rows) or rows[:, 0].max() > max_id:
        return None
    votes = np.zeros(int(rows[:, 0].max()) + 1, np.int64)
    votes[rows[:, 0]] = rows[:, 1]
    return votes


def _open_for_writing(path: Path, tmp: Path, **kwargs):
    """``tmp`` opened for writing; an error names ``path``, the file the user asked for."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(tmp, "w", **kwargs)
    except OSError as exc:
        raise write_error(path, exc) from None
