"""Segmenting a region of a whole slide at full resolution, block by block, glass skipped.

Tissue is found once, on a low-resolution pyramid level (a few Mpx at most); the region is then
cut into blocks aligned with the output's chunks, and only blocks that hold tissue are read at
full resolution and run through the ``Segmenter`` (with a ``halo`` of context, so the model sees
across block borders as it does across its own tiles). Results go straight into the ``out``
arrays (zarr or memmap), so memory stays flat whatever the slide's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MedsegError
from ..steps import part_steps
from .postprocess import PostprocessSettings
from .settings import TileSettings
from ..io.images import intensity_range
from .source import ImageSource, looks_dark_field

BLOCK = 2048  # px per side of a block read at full resolution (12 MB of RGB)
HALO = 64  # px of context read around a block
TISSUE_MAX_SIDE = 2048  # the tissue mask is made on the finest level at most this long
PROGRESS_PER_BLOCK = 1000  # progress units per block: cancel and the bar move tile by tile


class RegionError(MedsegError, ValueError):
    """A region that does not fit the slide, or that cannot be parsed."""


@dataclass(frozen=True)
class Region:
    """A rectangle in level-0 pixels: ``x, y`` its top-left corner."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self):
        for name in ("x", "y", "width", "height"):  # whole pixels: 600.5 had failed deep in a slice
            value = getattr(self, name)
            try:
                whole = int(value)
            except (TypeError, ValueError):
                whole = None
            if whole is None or isinstance(value, bool) or whole != value:
                raise RegionError(f"A region's {name} is a whole number of level-0 pixels, got {value!r}.")
            object.__setattr__(self, name, whole)

    @classmethod
    def parse(cls, text: str) -> "Region":
        """``"x,y,w,h"`` (level-0 px), as ``medseg predict --region`` takes it."""
        try:
            x, y, w, h = (int(v) for v in text.split(","))
        except ValueError:
            raise RegionError(f"Region '{text}': expected four integers x,y,width,height (level-0 pixels).") from None
        if w < 1 or h < 1:  # said once, before the model loads (it had been 'not on the slide', each slide skipped)
            raise RegionError(f"Region '{text}': width and height must be at least 1 pixel.")
        return cls(x, y, w, h)

    def checked(self, slide_shape: tuple[int, int], where: str = "slide") -> "Region":
        """Self clipped to the slide (or image: ``where`` names it); an error if nothing of it is on it."""
        height, width = slide_shape
        x0, y0 = max(0, self.x), max(0, self.y)
        x1, y1 = min(width, self.x + self.width), min(height, self.y + self.height)
        if self.width <= 0 or self.height <= 0 or x1 <= x0 or y1 <= y0:
            raise RegionError(f"Region x={self.x}, y={self.y}, {self.width}x{self.height} is not on the {where} "
                              f"({width}x{height} px).")
        return Region(x0, y0, x1 - x0, y1 - y0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def whole_slide(slide) -> Region:
    return Region(0, 0, slide.shape[1], slide.shape[0])


@dataclass
class TissueSettings:
    """Brightfield (H&E) tissue: coloured or dark pixels of a low-resolution level; glass is
    bright and grey. Off for fluorescence, whose background is dark."""

    enabled: bool = True
    max_side: int = TISSUE_MAX_SIDE
    min_saturation: int = 20  # max - min over RGB, 0..255: stained tissue is coloured
    max_brightness: int = 210  # mean over RGB: darker than this is tissue even when grey
    min_brightness: int = 10  # black is no tissue: padding outside the scanned area


@dataclass
class TissueMask:
    """A boolean mask on a low-resolution level, ``downsample`` level-0 px per mask pixel down,
    ``downsample_x`` across (the same when ``None``): a level's sides are rounded each on its own,
    so a long slide's two scales differ (2100 / 66 rows is 31.8, 65536 / 2048 columns 32: one
    scale had put a strip of tissue 11 mask columns off, and the run found no nuclei)."""

    mask: np.ndarray
    downsample: float
    dark_field: bool = False  # the level's background is dark (fluorescence): ``source.looks_dark_field``
    downsample_x: float | None = None
    gray: bool = False  # the level holds no colour (one channel, or R = G = B): every pixel counts as tissue

    @property
    def scales(self) -> tuple[float, float]:
        """Level-0 px per mask pixel, ``(down, across)``."""
        return self.downsample, self.downsample if self.downsample_x is None else self.downsample_x

    def _overlapped(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The mask pixels the level-0 rectangle overlaps."""
        dy, dx = self.scales
        my0, mx0 = int(y0 / dy), int(x0 / dx)
        my1, mx1 = max(my0 + 1, int(np.ceil(y1 / dy))), max(mx0 + 1, int(np.ceil(x1 / dx)))
        return self.mask[my0:my1, mx0:mx1]

    def any_in(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether the level-0 rectangle holds tissue (the mask pixels it overlaps)."""
        return bool(self._overlapped(y0, y1, x0, x1).any())

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, region: Region) -> float:
        """The share of ``region`` that is tissue (of the mask pixels it overlaps)."""
        inside = self._overlapped(region.y, region.y + region.height, region.x, region.x + region.width)
        return float(inside.mean()) if inside.size else 0.0


def find_tissue(slide, settings: TissueSettings | None = None) -> TissueMask:
    """The tissue mask of a slide, from its finest level no longer than ``settings.max_side``."""
    from scipy import ndimage as ndi

    s = settings or TissueSettings()
    level = slide.levels[slide.level_for(s.max_side)]
    # a slide without a level that small (a flat TIFF) is read every step-th pixel: read whole, a
    # 40k² one would take ~40 GB on its way to the mask
    step = max(1, -(-max(level.shape[:2]) // s.max_side))
    low = np.asarray(level[::step, ::step] if step > 1 else level)
    downsample, downsample_x = slide.shape[0] / low.shape[0], slide.shape[1] / low.shape[1]
    channels = low[..., :3] if low.ndim == 3 else low[..., None]
    if low.dtype != np.uint8:  # 16-bit: compare on the 8-bit scale
        channels = channels / max(1, float(low.max())) * 255
    channels = channels.astype(np.int16)
    brightness = channels.mean(-1)
    dark = looks_dark_field(brightness)
    saturation = channels.max(-1) - channels.min(-1)
    gray = low.ndim != 3 or low.shape[-1] < 3 or int(saturation.max(initial=0)) <= 2  # as ImageSource.looks_gray
    if not s.enabled or low.ndim != 3 or low.shape[-1] < 3:
        return TissueMask(np.ones(low.shape[:2], bool), downsample, dark, downsample_x, gray)
    tissue = ((saturation >= s.min_saturation) | (brightness <= s.max_brightness)) & (brightness >= s.min_brightness)
    return TissueMask(ndi.binary_opening(tissue), downsample, dark, downsample_x, gray)  # specks of dust: no tissue


def region_blocks(region: Region, block: int = BLOCK) -> list[tuple[int, int, int, int]]:
    """Level-0 blocks ``(y0, y1, x0, x1)`` covering the region, aligned to multiples of ``block``
    (so they fall on whole chunks of an output chunked by ``block``), in raster order."""
    y_end, x_end = region.y + region.height, region.x + region.width
    ys = range(region.y - region.y % block, y_end, block)
    xs = range(region.x - region.x % block, x_end, block)
    return [(max(y, region.y), min(y + block, y_end), max(x, region.x), min(x + block, x_end)) for y in ys for x in xs]


def iter_segment_region(segmenter, slide, region: Region | None = None, out=None, distance_out=None,
                        settings: TileSettings | None = None, tissue: TissueMask | None = None,
                        block: int = BLOCK, halo: int = HALO, postprocess: PostprocessSettings | None = None):
    """Generator: yields ``(done, total)`` (``PROGRESS_PER_BLOCK`` units per tissue block), writes
    the class map of ``region`` into ``out`` and returns the number of level-0 px segmented.

    ``out`` and ``distance_out`` are slide-sized ``(H, W)`` writable arrays (zarr, memmap, numpy),
    zeros where nothing is written; ``distance_out`` only for models with a distance head.
    ``tissue``: a mask from ``find_tissue`` (found here if None); blocks without tissue are skipped.
    ``postprocess`` (small objects, holes) applies per block, as ``Segmenter.iter_segment`` does.
    Blocks are resampled to the model's pixel size where the slide's differs (``rescale``).
    """
    region = (region or whole_slide(slide)).checked(slide.shape)
    if out is None or tuple(out.shape) != slide.shape:
        raise RegionError(f"The output array must be slide-sized {slide.shape}, got {None if out is None else out.shape}.")
    tissue = tissue if tissue is not None else find_tissue(slide)
    blocks = [b for b in region_blocks(region, block) if tissue.any_in(*b)]
    total, segmented = len(blocks) * PROGRESS_PER_BLOCK, 0
    value_range = slide_intensity_range(slide)
    for index, (y0, y1, x0, x1) in enumerate(blocks):
        window = _window(slide.shape, region, (y0, y1, x0, x1), halo)
        pixels = np.asarray(slide.levels[0][window[0]:window[1], window[2]:window[3]])
        local_distance = np.zeros(pixels.shape[:2], np.float32) if distance_out is not None else None
        if value_range != "auto":  # 16-bit or float: the slide's range, not the block's own
            pixels = ImageSource(pixels, segmenter.meta.model.in_channels, value_range)
        steps = segmenter.iter_segment(pixels, settings, postprocess, distance_out=local_distance,
                                       pixel_size_um=slide.pixel_size_um)  # at the model's pixel size
        labels = yield from part_steps(steps, index, PROGRESS_PER_BLOCK, total)
        core = (slice(y0 - window[0], y1 - window[0]), slice(x0 - window[2], x1 - window[2]))
        out[y0:y1, x0:x1] = labels[core]
        if distance_out is not None:
            distance_out[y0:y1, x0:x1] = local_distance[core]
        segmented += (y1 - y0) * (x1 - x0)
        yield (index + 1) * PROGRESS_PER_BLOCK, total
    return segmented


def slide_intensity_range(slide) -> tuple[float, float] | None | str:
    """What a non-8-bit slide's pixels map to [0, 1] from (``intensity_range``), once for the slide,
    from a level no larger than the tissue finder's; ``"auto"`` for 8-bit slides (fixed: /255)."""
    if np.dtype(slide.levels[0].dtype) == np.uint8:
        return "auto"
    level = slide.levels[slide.level_for(TISSUE_MAX_SIDE)]
    step = max(1, -(-max(level.shape[:2]) // TISSUE_MAX_SIDE))
    return intensity_range(np.asarray(level[::step, ::step]))


def _window(shape, region: Region, block: tuple[int, int, int, int], halo: int) -> tuple[int, int, int, int]:
    """The block grown by ``halo`` px, within the region and the slide."""
    y0, y1, x0, x1 = block
    return (max(region.y, y0 - halo), min(region.y + region.height, y1 + halo),
            max(region.x, x0 - halo), min(region.x + region.width, x1 + halo))

