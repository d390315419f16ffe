"""Whole-slide images: every pyramid level as a lazy array, and the physical pixel size.

Aperio ``.svs``, Hamamatsu ``.ndpi``, Leica ``.scn``, Ventana ``.bif`` and pyramidal (OME-)TIFF
are TIFFs that tifffile reads natively (the levels of the series holding the scan, decoded tile
by tile through a zarr store). Other vendor formats (MIRAX ``.mrxs``, ...) go through OpenSlide
when its optional Python wheels are installed. Nothing is decoded until a region is sliced.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from .images import ImageReadError, without_alpha
from .lazy import main_series_index, open_tiff_lazy, should_open_lazily

TIFF_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
SLIDE_SUFFIXES = TIFF_SLIDE_SUFFIXES + OPENSLIDE_SUFFIXES
# TIFF ResolutionUnit -> micrometres per unit
_UNIT_UM = {2: 25_400.0, 3: 10_000.0}


class SlideError(MedsegError, ValueError):
    """A slide cannot be opened (unknown format, missing optional reader, broken file)."""


@dataclass
class Slide:
    """A whole-slide image: ``levels[0]`` is full resolution, ``(H, W[, C])`` lazy arrays."""

    path: Path
    levels: list
    pixel_size_um: float | None = None  # side of a level-0 pixel
    vendor: str = "tiff"
    metadata: dict = field(default_factory=dict)
    # (x, y) of level 0's first pixel in the file's own level-0 frame: not (0, 0) where the slide
    # was cropped to its scanned bounds (OpenSlide, as QuPath does)
    origin: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)  # what a run on it should say (a cut-off file's tail)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape[:2])

    @property
    def downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each level (along Y)."""
        return [self.shape[0] / level.shape[0] for level in self.levels]

    def level_for(self, max_side: int) -> int:
        """The finest level whose longer side is at most ``max_side`` (the coarsest if none is)."""
        for i, level in enumerate(self.levels):
            if max(level.shape[:2]) <= max_side:
                return i
        return len(self.levels) - 1


def is_slide_path(path: str | os.PathLike) -> bool:
    """A vendor slide file, or a TIFF large or pyramidal enough to be read lazily."""
    p = Path(path)
    return p.is_file() and (p.suffix.lower() in SLIDE_SUFFIXES or should_open_lazily(p))


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a slide lazily: its pyramid levels and its pixel size (None when not recorded)."""
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"Slide '{p}' does not exist.")
    if p.suffix.lower() in OPENSLIDE_SUFFIXES:
        return _open_with_openslide(p)
    from .images import tifffile_quiet

    try:
        with tifffile_quiet():  # a cut-off file's tifffile log lines: said once, below, in the user's words
            levels = open_tiff_lazy(p)
    except ImageReadError as exc:
        cut = tiff_truncation(p)  # OpenSlide would call it 'Unsupported or missing image file'
        if cut is not None:
            raise SlideError(f"Cannot open '{p.name}': the file looks truncated ({cut}): a cut-off copy or "
                             "download. Copy it again from the original.") from exc
        if p.suffix.lower() in TIFF_SLIDE_SUFFIXES:
            return _open_with_openslide(p, cause=exc)
        raise SlideError(str(exc)) from exc
    size, vendor, meta = tiff_pixel_size_um(p)
    cut = tiff_truncation(p)  # its image whole, but directories after it (label, macro) lost
    notes = [f"the file looks truncated ({cut}); its image reads whole, but copy it again from the original"
             ] if cut else []
    return Slide(p, levels, size, vendor, meta, notes=notes)


def tiff_truncation(path: str | os.PathLike, max_directories: int = 100_000) -> str | None:
    """Where a TIFF (or a TIFF-based slide) is cut off, in words, when its header or chain of image
    directories points past the end of the file; ``None`` when it does not (or it is no TIFF).
    Whole-slide scanners write the directories at the end, so a cut-off copy loses them first."""
    import struct

    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return None
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:  # classic TIFF: 4-byte offsets, 2-byte entry counts, 12-byte entries
            offset, count_fmt, entry, next_fmt = struct.unpack(order + "I", head[4:8])[0], "H", 12, "I"
        elif version == 43 and len(head) >= 16:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
            offset, count_fmt, entry, next_fmt = struct.unpack(order + "Q", head[8:16])[0], "Q", 20, "Q"
        else:
            return None
        count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        seen: set[int] = set()
        for index in range(max_directories):
            if offset == 0 or offset in seen:
                return None
            seen.add(offset)
            what = "its header places the first image directory" if index == 0 else f"image directory {index + 1} lies"
            if offset + count_size > size:
                return f"{what} at byte {offset:,}, but the file ends at byte {size:,}"
            f.seek(offset)
            entries = struct.unpack(order + count_fmt, f.read(count_size))[0]
            end = offset + count_size + entries * entry + next_size
            if end > size:
                return f"image directory {index + 1} runs to byte {end:,}, but the file ends at byte {size:,}"
            f.seek(offset + count_size + entries * entry)
            offset = struct.unpack(order + next_fmt, f.read(next_size))[0]
    return None


def tiff_pixel_size_um(path: str | os.PathLike) -> tuple[float | None, str, dict]:
    """``(µm per level-0 pixel or None, vendor, metadata)`` from a slide TIFF's header: Aperio's
    ``MPP`` in the ImageDescription, OME-XML ``PhysicalSizeX`` of the image read (not a macro or
    label image listed before it), ImageJ's calibration, else the resolution tags. A size no
    microscope gives (an image editor's 72 dpi: 353 µm/px) is none (``is_plausible_pixel_size``)."""
    import tifffile

    from .images import tifffile_quiet

    # quiet: a cut-off file's 'invalid page offset' lines had reached the terminal (its note says it once)
    with tifffile_quiet(), tifffile.TiffFile(path) as tif:
        series = tif.series[main_series_index(tif)]
        page = series.levels[0].keyframe
        if tif.is_svs:
            meta = aperio_fields(page.description)
            return _believable(_number(meta.get("MPP"))), "aperio", meta
        if tif.is_ome:
            size = ome_pixel_size_um(tif.ome_metadata or "", page.imagewidth, page.imagelength)
            if size is not None:
                return _believable(size), "ome", {}
        if tif.is_imagej:
            size = _imagej_pixel_size_um(page, tif.imagej_metadata or {})
            if size is not None:
                return _believable(size), "imagej", {}
        vendor = "hamamatsu" if tif.is_ndpi else "leica" if tif.is_scn else "tiff"
        return _believable(_resolution_tag_um(page)), vendor, {}


def _number(text: str | None) -> float | None:
    """A header's number: ``"0.2500"``, or ``"0,2500"`` as a scanner set to a comma locale writes
    it; ``None`` for anything else (the pixel size is then unknown, not a traceback)."""
    try:
        return float(text.strip().replace(",", ".")) if text else None
    except ValueError:
        return None


def _believable(size_um: float | None) -> float | None:
    from .pixel_size import is_plausible_pixel_size

    return size_um if is_plausible_pixel_size(size_um) else None


# µm per unit of the length units OME-XML and ImageJ write (OME's default unit is the µm)
_LENGTH_UNIT_UM = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
                   "micrometer": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def ome_pixel_size_um(ome_xml: str, width: int, height: int) -> float | None:
    """µm/px of the OME ``Image`` whose ``Pixels`` are ``width`` x ``height`` (the first if none
    matches), its ``PhysicalSizeXUnit`` converted; ``None`` where it records none."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    sized = [p for p in pixels if p.get("SizeX") == str(width) and p.get("SizeY") == str(height)]
    for p in sized or pixels[:1]:
        size, unit = p.get("PhysicalSizeX"), p.get("PhysicalSizeXUnit", "µm")
        if size is None or unit not in _LENGTH_UNIT_UM:
            return None
        try:
            return float(size) * _LENGTH_UNIT_UM[unit]
        except ValueError:
            return None
    return None


def _imagej_pixel_size_um(page, imagej_metadata: dict) -> float | None:
    """ImageJ's calibration: pixels per ``unit`` in the resolution tags (unit-less in TIFF's own
    ResolutionUnit), the unit in its description."""
    # ImageJ writes the micro sign as the text "\\u00B5m"
    unit = str(imagej_metadata.get("unit", "")).replace("\\u00B5", "\u00b5").replace("\\u00b5", "\u00b5")
    tag = page.tags.get("XResolution")
    if unit not in _LENGTH_UNIT_UM or tag is None:
        return None
    num, den = tag.value
    return _LENGTH_UNIT_UM[unit] * den / num if num else None


def _resolution_tag_um(page) -> float | None:
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is None or unit is None or int(unit.value) not in _UNIT_UM:
        return None
    num, den = tag.value
    return _UNIT_UM[int(unit.value)] * den / num if num else None


def aperio_fields(description: str) -> dict[str, str]:
    """``key = value`` fields of an Aperio ImageDescription (``...|AppMag = 20|MPP = 0.499``)."""
    pairs = (part.split("=", 1) for part in description.split("|")[1:] if "=" in part)
    return {key.strip(): value.strip() for key, value in pairs}


def _open_with_openslide(path: Path, cause: Exception | None = None) -> Slide:
    try:
        import openslide
    except ImportError:
        raise SlideError(
            f"'{path.name}' needs OpenSlide, which is not installed: "
            "pip install 'napari-medseg[openslide]' (openslide-python and openslide-bin)."
        ) from cause
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as exc:  # OpenSlide raises its own types for unknown or broken files
        raise SlideError(f"Cannot open '{path.name}' as a slide ({type(exc).__name__}: {exc}).") from exc
    import dask.array as da

    bounds = openslide_bounds(osr.properties)
    levels = [_openslide_level(osr, i, da, bounds) for i in range(osr.level_count)]
    mpp = osr.properties.get("openslide.mpp-x")
    return Slide(path, levels, float(mpp) if mpp else None, osr.properties.get("openslide.vendor", "openslide"),
                 dict(osr.properties), origin=(0, 0) if bounds is None else bounds[:2])


def openslide_bounds(properties) -> tuple[int, int, int, int] | None:
    """``(x, y, width, height)`` of the scanned area in OpenSlide's level-0 frame, when the slide
    records all four (MIRAX, Leica, ...). The slide is cropped to it, as QuPath does by default:
    the glass around is never shown or read, and results line up with QuPath's coordinates."""
    keys = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")
    try:
        x, y, width, height = (int(properties[k]) for k in keys)
    except (KeyError, ValueError):
        return None
    return (x, y, width, height) if width > 0 and height > 0 else None


def _openslide_level(osr, index: int, da, bounds: tuple[int, int, int, int] | None = None, chunk: int = 1024):
    """One OpenSlide level as a dask array ``(H, W, 3)`` uint8, read region by region; within
    ``bounds`` (level-0 ``x, y, width, height``) when given."""
    scale = osr.level_downsamples[index]
    if bounds is None:
        (width, height), (left, top) = osr.level_dimensions[index], (0, 0)
    else:
        left, top = bounds[:2]
        width, height = max(1, int(bounds[2] / scale)), max(1, int(bounds[3] / scale))

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        region = osr.read_region((left + int(x0 * scale), top + int(y0 * scale)), index, (x1 - x0, y1 - y0))
        return over_white(np.asarray(region))

    chunks = (_chunk_sizes(height, chunk), _chunk_sizes(width, chunk), (3,))
    return da.map_blocks(block, chunks=chunks, dtype=np.uint8)


def over_white(rgba: np.ndarray) -> np.ndarray:
    """An RGBA region (openslide-python's: not premultiplied) as RGB over white: areas never
    scanned (transparent) read as glass, not as the black a tissue finder and a model would take
    for dark tissue."""
    return without_alpha(rgba)


def _chunk_sizes(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - i) for i in range(0, n, chunk))
