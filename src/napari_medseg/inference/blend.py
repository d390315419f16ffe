"""Stitching: tile predictions blended into a band buffer and finalised row by row.

The engine walks the image in rows of overlapping tiles (``windows``). Each tile's softmax
is weighted by a blend map and added into a band buffer a few tile rows high; as soon as no
later tile can touch a row, that row is final: it is divided by the summed weights, turned
into a uint8 class map (and, on request, float16 probabilities) and dropped from the buffer.
Memory therefore grows with the image *width*, never its area, and the input may be a lazy
array (dask/zarr/memmap, e.g. a tiled whole-slide TIFF) read one strip of rows at a time.

Near-white glass tiles of H&E images are background without running the model.
"""

from __future__ import annotations

import math
from typing import Callable, Generator

import numpy as np
import torch

from .forward import Batcher, RunReport, prepare_model
from .settings import TileSettings
from .source import ImageSource
from .windows import blend_weights, glass_fraction, tile_starts

FINALISE_COLUMNS = 1024  # finished rows are divided and argmaxed this many columns at a time


def classify(probs: np.ndarray, foreground_threshold: float | None = None) -> np.ndarray:
    """Class ids from probabilities ``(C, ...)``: the argmax, or, with ``foreground_threshold``,
    the likeliest foreground class where the foreground probability ``1 - p[0]`` exceeds the
    threshold and background elsewhere (a tuned operating point, e.g. for under-calling models)."""
    if foreground_threshold is None or probs.shape[0] < 2:
        return probs.argmax(0)
    return np.where(1.0 - probs[0] > foreground_threshold, probs[1:].argmax(0) + 1, 0)


def iter_blend(model: torch.nn.Module, source: ImageSource, num_classes: int, settings: TileSettings,
               device: torch.device, normalise: Callable[[np.ndarray], np.ndarray] | None = None,
               out=None, probabilities_out=None, report: RunReport | None = None,
               distance_head: bool = False, distance_out=None, foreground_threshold: float | None = None,
               ) -> Generator[tuple[int, int], None, object]:
    """Generator: yields ``(tiles_done, tiles_total)`` after every batch; returns the class map.

    ``normalise`` maps ``[0, 1]`` pixels to model input (mean/std); ``out`` (``(H, W)``, any
    writable array, default a new uint8 numpy array) receives the class map row by row;
    ``probabilities_out`` (``(C, H, W)``, e.g. a float16 memmap) receives the blended
    probabilities when given. ``distance_head``: the model has one more output channel, a
    sigmoid distance map, blended like the probabilities and written to ``distance_out``
    (``(H, W)``) when given. ``foreground_threshold``: see ``classify``.
    """
    report = report if report is not None else RunReport()
    height, width = source.height, source.width
    tile, stride = settings.tile_size, settings.tile_size - settings.overlap
    padded_h, padded_w = max(height, tile), max(width, tile)
    ys, xs = tile_starts(padded_h, tile, stride), tile_starts(padded_w, tile, stride)
    total = len(ys) * len(xs)
    report.tiles, report.batch_size = total, settings.batch_size
    if out is None:
        out = np.zeros((height, width), np.uint8 if num_classes <= 256 else np.uint16)
    weights = blend_weights(tile, settings.blend)
    skip = settings.skip_background and source.rgb and source.channels == 3
    model = prepare_model(model, settings, device)
    run_batch = Batcher(model, settings, device, report, num_classes)
    channels = num_classes + int(distance_head)

    # The band buffer holds rows [base, base + band): the open tile rows a batch can span.
    rows_per_batch = math.ceil(settings.batch_size / len(xs))
    band = min(padded_h, tile + stride * rows_per_batch)
    acc = np.zeros((channels, band, padded_w), np.float32)
    norm = np.zeros((band, padded_w), np.float32)
    base = 0
    pending: list[tuple[int, int, np.ndarray]] = []  # (row index, x, normalised tile)
    done = 0

    def finalise(until: int) -> None:
        """Rows [base, until) are complete: write them out and slide the buffer."""
        nonlocal base
        n = until - base
        if n <= 0:
            return
        rows_out = min(until, height) - base
        for left in range(0, width if rows_out > 0 else 0, FINALISE_COLUMNS):  # column chunks: small temporaries
            right = min(width, left + FINALISE_COLUMNS)
            probs = acc[:, :rows_out, left:right] / norm[:rows_out, left:right]
            out[base:base + rows_out, left:right] = classify(probs[:num_classes], foreground_threshold).astype(
                out.dtype, copy=False)
            if probabilities_out is not None:
                probabilities_out[:, base:base + rows_out, left:right] = probs[:num_classes]
            if distance_out is not None:
                distance_out[base:base + rows_out, left:right] = probs[num_classes]
        acc[:, :band - n] = acc[:, n:]
        acc[:, band - n:] = 0
        norm[:band - n] = norm[n:]
        norm[band - n:] = 0
        base = until

    def add(row: int, x: int, probs: np.ndarray | None) -> None:
        top = ys[row] - base
        if probs is None:  # glass: certain background
            acc[0, top:top + tile, x:x + tile] += weights
        else:
            acc[:, top:top + tile, x:x + tile] += probs
        norm[top:top + tile, x:x + tile] += weights

    def flush() -> None:
        nonlocal pending, done
        if not pending:
            return
        probs = run_batch(np.stack([t for _, _, t in pending]))
        for (row, x, _), p in zip(pending, probs):
            add(row, x, p)
        done += len(pending)
        pending = []

    reported = 0
    for row, y in enumerate(ys):
        # Rows above the oldest tile row still in play are final.
        finalise(ys[pending[0][0]] if pending else y)
        if y + tile > base + band:  # no room for this row: run what is pending (a partial batch) first
            flush()
            finalise(y)
            if done > reported:
                reported = done
                yield done, total
        # The strip stays as stored (uint8 for H&E); tiles are converted one at a time.
        strip = source.rows(y, min(y + tile, height))
        if strip.shape[0] < tile or strip.shape[1] < tile:  # image smaller than a tile
            pad = ((0, tile - min(tile, strip.shape[0])), (0, max(0, tile - strip.shape[1])))
            strip = np.pad(strip, pad + ((0, 0),) * (strip.ndim - 2), mode="symmetric")
        skipped_in_row = 0
        for x in xs:
            tile01 = source.to01(strip[:, x:x + tile])
            if skip and 1.0 - glass_fraction(tile01, settings.background_level) <= settings.max_tissue_fraction:
                add(row, x, None)
                report.skipped_background += 1
                done += 1
                skipped_in_row += 1
                continue
            pending.append((row, x, normalise(tile01) if normalise is not None else tile01))
            if len(pending) >= settings.batch_size:
                flush()
                reported = done
                yield done, total
        if skipped_in_row == len(xs) and done > reported:
            reported = done
            yield done, total  # a row of glass: still report (and let a cancel in)
    flush()
    finalise(padded_h)
    if done > reported:
        yield done, total
    return out
