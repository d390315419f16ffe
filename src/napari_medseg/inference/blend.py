"""Stitching: tile predictions blended into a band buffer and finalised row by row.

The engine walks the image in rows of overlapping tiles (``windows``). Each tile's softmax
is weighted by a blend map and added into a band buffer a few tile rows high (``BandMerger``);
as soon as no later tile can touch a row, that row is final: it is divided by the summed
weights, turned into a uint8 class map (and, on request, float16 probabilities) and dropped
from the buffer. Memory therefore grows with the image *width*, never its area, and the input
may be a lazy array (dask/zarr/memmap, e.g. a tiled whole-slide TIFF) read one strip of rows
at a time. ``iter_blend`` drives it: cut (``windows``), run (``forward``), stitch (here).

Near-white glass tiles of H&E images are background without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from .class_decision import classify
from .forward import Batcher, prepare_model
from .run_report import RunReport
from .settings import TileSettings
from .source import ImageSource
from .windows import TileGrid, blend_weights, glass_fraction

FINALISE_COLUMNS = 1024  # finished rows are divided and argmaxed this many columns at a time


@dataclass
class Outputs:
    """Where finished rows go: the class map, and on request the probabilities and distance map."""

    classes: object  # (H, W), any writable array
    num_classes: int
    foreground_threshold: float | None = None
    probabilities: object = None  # (C, H, W)
    distance: object = None  # (H, W): the distance head's channel, after the class channels
    class_weights: object = None  # see ``classify``

    def write(self, top: int, left: int, probs: np.ndarray) -> None:
        """Final blended ``probs`` (``(C[+1], h, w)``) of the block at ``(top, left)``."""
        rows, cols = slice(top, top + probs.shape[1]), slice(left, left + probs.shape[2])
        class_probs = probs[:self.num_classes]
        self.classes[rows, cols] = classify(class_probs, self.foreground_threshold, self.class_weights).astype(
            self.classes.dtype, copy=False)
        if self.probabilities is not None:
            self.probabilities[:, rows, cols] = class_probs
        if self.distance is not None:
            self.distance[rows, cols] = probs[self.num_classes]


class BandMerger:
    """Weighted tile predictions summed into a buffer of image rows ``[base, base + band)``.

    ``add`` and ``add_glass`` accumulate a tile; ``finalise(until)`` divides rows
    ``[base, until)`` by their summed blend weights, hands them to ``Outputs`` a column chunk
    at a time (small temporaries) and slides the buffer down. Every tile of the grid is added
    once at its blend weight (glass too), so the summed weights follow from the grid alone and
    are summed per chunk (``weight_sum``) instead of kept in a buffer. Rows and columns past
    the image (a tile larger than the image is padded) are never written out.
    """

    def __init__(self, outputs: Outputs, channels: int, band: int, size: tuple[int, int],
                 grid: TileGrid, weights: np.ndarray):
        self.outputs, self.band, self.weights, self.grid = outputs, band, weights, grid
        self.height, self.width = size
        self.tile = weights.shape[0]
        self.acc = np.zeros((channels, band, grid.padded_width), np.float32)
        self.base = 0

    def has_room_for(self, y: int) -> bool:
        """Whether a tile row starting at image row ``y`` fits in the buffer as it stands."""
        return y + self.tile <= self.base + self.band

    def add(self, y: int, x: int, weighted_probs: np.ndarray) -> None:
        top = y - self.base
        self.acc[:, top:top + self.tile, x:x + self.tile] += weighted_probs

    def add_glass(self, y: int, x: int) -> None:
        """A glass tile: certain background, at the tile's blend weight."""
        top = y - self.base
        self.acc[0, top:top + self.tile, x:x + self.tile] += self.weights

    def finalise(self, until: int) -> None:
        """Rows ``[base, until)`` are complete: write them out and slide the buffer."""
        n = until - self.base
        if n <= 0:
            return
        rows_out = min(until, self.height) - self.base
        for left in range(0, self.width if rows_out > 0 else 0, FINALISE_COLUMNS):
            right = min(self.width, left + FINALISE_COLUMNS)
            probs = self.acc[:, :rows_out, left:right]
            probs /= self.weight_sum(self.base, self.base + rows_out, left, right)  # in place: rows done
            self.outputs.write(self.base, left, probs)
        self._slide(n)
        self.base = until

    def _slide(self, n: int) -> None:
        """Drop the buffer's first ``n`` rows; the rows freed at the bottom start from zero.

        Moved at most ``n`` rows of one channel at a time: source and destination then never
        overlap, so numpy copies in place instead of through a temporary of the whole buffer."""
        keep = self.band - n
        for top in range(0, keep, n):
            rows = min(n, keep - top)
            for plane in self.acc:
                plane[top:top + rows] = plane[n + top:n + top + rows]
        self.acc[:, keep:] = 0

    def weight_sum(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """The summed blend weights of the grid's tiles over image rows ``[top, bottom)`` and
        columns ``[left, right)``, added in the tiles' order (row by row, left to right)."""
        total = np.zeros((bottom - top, right - left), np.float32)
        t = self.tile
        for y in self.grid.ys:
            if y >= bottom or y + t <= top:
                continue
            r0, r1 = max(y, top), min(y + t, bottom)
            for x in self.grid.xs:
                if x < right and x + t > left:
                    c0, c1 = max(x, left), min(x + t, right)
                    total[r0 - top:r1 - top, c0 - left:c1 - left] += self.weights[r0 - y:r1 - y, c0 - x:c1 - x]
        return total


def iter_blend(model, source: ImageSource, num_classes: int, settings: TileSettings,
               device, normalise: Callable[[np.ndarray], np.ndarray] | None = None,
               out=None, probabilities_out=None, report: RunReport | None = None,
               distance_head: bool = False, distance_out=None, foreground_threshold: float | None = None,
               class_weights=None) -> Generator[tuple[int, int], None, object]:
    """Generator: yields ``(tiles_done, tiles_total)`` after every batch; returns the class map.

    ``model``: a PyTorch module or any callable from a float32 NCHW tensor to logits (``backends``).
    ``normalise`` maps ``[0, 1]`` pixels to model input (mean/std); ``out`` (``(H, W)``, any
    writable array, default a new uint8 numpy array) receives the class map row by row;
    ``probabilities_out`` (``(C, H, W)``, e.g. a float16 memmap) receives the blended
    probabilities when given. ``distance_head``: the model has one more output channel, a
    sigmoid distance map, blended like the probabilities and written to ``distance_out``
    (``(H, W)``) when given. ``foreground_threshold``, ``class_weights``: see ``classify``.
    """
    report = report if report is not None else RunReport()
    grid = TileGrid.cover(source.height, source.width, settings.tile_size, settings.overlap)
    tile, total = grid.tile, grid.total
    report.tiles, report.batch_size = total, settings.batch_size
    if out is None:
        out = np.zeros((source.height, source.width), np.uint8 if num_classes <= 256 else np.uint16)
    # the distance channel is blended only when someone reads it (half again the buffer of a 2-class model)
    channels = num_classes + int(distance_head and distance_out is not None)
    merger = BandMerger(Outputs(out, num_classes, foreground_threshold, probabilities_out, distance_out, class_weights),
                        channels, grid.band(settings.batch_size),
                        (source.height, source.width), grid, blend_weights(tile, settings.blend))
    skip = settings.skip_background and source.rgb and source.channels == 3
    run_batch = Batcher(prepare_model(model, settings, device), settings, device, report, num_classes, channels)
    pending: list[tuple[int, int, np.ndarray]] = []  # (y, x, model input) waiting for a batch
    done = reported = 0
    for y in grid.ys:
        merger.finalise(pending[0][0] if pending else y)  # rows above the oldest open tile row are final
        if not merger.has_room_for(y):  # run what is pending (a partial batch) first
            done += _run(pending, run_batch, merger)
            merger.finalise(y)
            if done > reported:
                reported = done
                yield done, total
        strip = _strip(source, y, tile)
        all_glass = True
        for x in grid.xs:
            tile01 = source.to01(strip[:, x:x + tile])
            if skip and _is_glass(tile01, settings):
                merger.add_glass(y, x)
                report.skipped_background += 1
                done += 1
                continue
            all_glass = False
            pending.append((y, x, normalise(tile01) if normalise is not None else tile01))
            if len(pending) >= settings.batch_size:
                done += _run(pending, run_batch, merger)
                reported = done
                yield done, total
        if all_glass and done > reported:
            reported = done
            yield done, total  # a row of glass: still report (and let a cancel in)
    done += _run(pending, run_batch, merger)
    merger.finalise(grid.padded_height)
    if done > reported:
        yield done, total
    return out


def _run(pending: list[tuple[int, int, np.ndarray]], run_batch: Batcher, merger: BandMerger) -> int:
    """Run the pending tiles as one batch into the merger; empties ``pending``, returns how many ran."""
    if not pending:
        return 0
    probs = run_batch(np.stack([t for _, _, t in pending]))
    for (y, x, _), p in zip(pending, probs):
        merger.add(y, x, p)
    n = len(pending)
    pending.clear()
    return n


def _is_glass(tile01: np.ndarray, settings: TileSettings) -> bool:
    return 1.0 - glass_fraction(tile01, settings.background_level) <= settings.max_tissue_fraction


def _strip(source: ImageSource, y: int, tile: int) -> np.ndarray:
    """Rows ``[y, y + tile)`` as stored (uint8 for H&E; tiles are converted one at a time),
    mirrored out to a whole tile where the image is smaller than one."""
    strip = source.rows(y, min(y + tile, source.height))
    if strip.shape[0] < tile or strip.shape[1] < tile:
        pad = ((0, tile - min(tile, strip.shape[0])), (0, max(0, tile - strip.shape[1])))
        strip = np.pad(strip, pad + ((0, 0),) * (strip.ndim - 2), mode="symmetric")
    return strip
