"""The image side of inference: rows of a 2-D gray or RGB image, eager or lazy, read on demand
and mapped to float32 ``[0, 1]`` with statistics computed once per image."""

from __future__ import annotations

import os

import numpy as np

from ..io.images import (ImageReadError, intensity_range, plane_layout, scale_to_unit, validate_image_array,
                         without_alpha)


# a fluorescence (or dark-field) image is mostly near-black background: median brightness 4 of
# 255 on the DAPI NDPI here; brightfield H&E never is: glass ~240, and the darkest of the 495
# CoNSeP / MoNuSeg / TNBC images (a dense CoNSeP patch) has a median of 46, no pixel under 25
DARK_FIELD_MEDIAN = 25
DARK_FIELD_PATCHES, DARK_FIELD_PATCH = 8, 32  # the check reads an 8 x 8 grid of 32² px windows
# a model trained on H&E finds no nuclei (or wrong ones) there: 0 nuclei on the DAPI slide, silently
DARK_NOTE = ("the image has a dark background (fluorescence?) but the model was trained on brightfield H&E: "
             "expect no or wrong nuclei; use a model trained on such images")


def looks_dark_field(brightness: np.ndarray) -> bool:
    """Whether pixels' brightness (0-255, mean over channels) is mostly that of a dark background."""
    return brightness.size > 0 and float(np.median(brightness)) < DARK_FIELD_MEDIAN


class ImageSource:
    """Rows of a 2-D gray or RGB image, read on demand and mapped to float32 ``[0, 1]``.

    ``array`` may be a numpy array (checked whole, as ``validate_image_array``) or any lazy
    array with ``shape``, ``dtype`` and slicing (dask, zarr, memmap) in a layout that
    ``plane_layout`` accepts: ``(H, W)``, ``(H, W, 3|4)`` or ``(3|4, H, W)``, with singleton
    axes outside the plane.
    """

    def __init__(self, array, channels: int, value_range: tuple[float, float] | None | str = "auto"):
        """``value_range``: ``intensity_range``'s, given where the array is a piece of a larger
        image (a slide's block: a block of background alone would be stretched to full range)."""
        if isinstance(array, (str, os.PathLike)):  # np.asarray would make it a 0-d array of text
            raise ImageReadError(f"The segmenter takes an image's pixels (an array), not a file name ('{array}'): "
                                 "read it first (napari_medseg.io.read_image), or use "
                                 "napari_medseg.inference.segment_file, which also reads the file's pixel size.")
        # several images (nested lists of numbers are one image's pixels): 'save one plane per file'
        # had been the answer
        if isinstance(array, (list, tuple)) and array and all(getattr(a, "ndim", 0) >= 2 for a in array):
            raise ImageReadError(f"The segmenter takes one image at a time, got a {type(array).__name__} of "
                                 f"{len(array)}: call it once per image (or medseg predict FOLDER for a folder).")
        self.channels = channels
        self._lazy = not isinstance(array, np.ndarray) and hasattr(array, "shape")
        if self._lazy:  # the plane is found from the shape: no pixel is read here but the statistics' sample
            layout = plane_layout(array.shape, array.dtype)
            self._array, self._channel_first = layout.select(array), layout.channel_first
        else:
            self._array, self._channel_first = validate_image_array(np.asarray(array)), False
        shape = self._array.shape
        self.height, self.width = (shape[1], shape[2]) if self._channel_first else (shape[0], shape[1])
        self.rgb = len(shape) == 3
        self.value_range = intensity_range(self._array_hwc_rows_view()) if isinstance(value_range, str) else value_range

    def _array_hwc_rows_view(self):
        """Channel-last rows without alpha, for the statistics (alpha says nothing of the stain)."""
        return _RowsView(self) if self._channel_first or self._lazy else without_alpha(self._array)

    def raw_rows(self, top: int, bottom: int) -> np.ndarray:
        if self._channel_first:
            return np.moveaxis(np.asarray(self._array[:, top:bottom]), 0, -1)
        return np.asarray(self._array[top:bottom])

    def window(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """The window ``[top, bottom) x [left, right)`` as stored (``(h, w)`` or ``(h, w, 3)``),
        checked for NaN; only those columns of a lazy image are read."""
        if self._channel_first:
            raw = np.moveaxis(np.asarray(self._array[:, top:bottom, left:right]), 0, -1)
        else:
            raw = np.asarray(self._array[top:bottom, left:right])
        raw = without_alpha(raw)
        if self._lazy and np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise ImageReadError(f"image: rows {top}-{bottom}, columns {left}-{right} contain NaN or infinite pixels.")
        return raw

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as stored (``(h, W)`` or ``(h, W, 3)``), checked for NaN."""
        return self.window(top, bottom, 0, self.width)

    def window01(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """A window as float32 ``(h, w, channels)`` in ``[0, 1]`` (a band of a slide is too wide to read whole)."""
        return self.to01(self.window(top, bottom, left, right))

    def rows01(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as float32 ``(h, W, channels)`` in ``[0, 1]``."""
        return self.to01(self.rows(top, bottom))

    def sampled_rows(self, count: int) -> np.ndarray:
        """``count`` row indices spread evenly from the first row to the last (fewer rows: all)."""
        return np.linspace(0, self.height - 1, min(count, self.height)).astype(int)

    def looks_dark_field(self, per_side: int = DARK_FIELD_PATCHES, patch: int = DARK_FIELD_PATCH) -> bool:
        """Whether the image's background is dark (``looks_dark_field``), judged on a grid of
        ``per_side`` x ``per_side`` windows of ``patch`` px spread over the image: a lazy tiled
        image decodes only the tiles under them (whole sampled rows had decoded every tile of 64
        tile rows: 1.5 s after a run on an 8192² tiled TIFF, now 0.27 s; on the 495 training
        images the darkest median is 46 either way)."""
        ys = np.linspace(0, max(0, self.height - patch), min(per_side, self.height)).astype(int)
        xs = np.linspace(0, max(0, self.width - patch), min(per_side, self.width)).astype(int)
        windows = [self.window01(y, min(self.height, y + patch), x, min(self.width, x + patch)).mean(-1).ravel()
                   for y in ys for x in xs]
        return looks_dark_field(np.concatenate(windows) * 255)

    def looks_gray(self, sample_rows: int = 64) -> bool:
        """Whether the image holds no colour: one channel, or RGB whose channels agree at every
        sampled row (a gray or fluorescence image saved as RGB). Reads ``sample_rows`` rows at most."""
        if not self.rgb:
            return True
        tolerance = 2 if np.issubdtype(self._array.dtype, np.integer) and self._array.dtype.itemsize == 1 else 0.01
        for top in self.sampled_rows(sample_rows):
            row = self.window(top, top + 1, 0, self.width).astype(np.float32)
            spread = row.max(-1) - row.min(-1)
            if self.value_range is not None and tolerance < 1:
                spread = spread / (self.value_range[1] - self.value_range[0])
            if spread.max() > tolerance:
                return False
        return True

    def to01(self, raw: np.ndarray) -> np.ndarray:
        """Pixels as stored -> float32 ``(..., channels)`` in ``[0, 1]``, with the image's statistics."""
        return scale_to_unit(raw, self.channels, self.value_range)


class _RowsView:
    """A channel-last view of a lazy array without alpha, for row sampling only."""

    def __init__(self, source: ImageSource):
        channels = (source._array.shape[0] if source._channel_first
                    else source._array.shape[2] if source._array.ndim == 3 else None)
        plane = (source.height, source.width)
        self.shape = plane if channels is None else (*plane, min(channels, 3))
        self._source, self.dtype = source, source._array.dtype

    def __getitem__(self, rows: slice):
        return without_alpha(self._source.raw_rows(rows.start, rows.stop))

    def __array__(self, dtype=None, copy=None):  # a short image is sampled whole
        rows = self[0:self.shape[0]]
        return rows if dtype is None else rows.astype(dtype)

