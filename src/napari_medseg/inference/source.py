"""The image side of inference: rows of a 2-D gray or RGB image, eager or lazy, read on demand
and mapped to float32 ``[0, 1]`` with statistics computed once per image."""

from __future__ import annotations

import numpy as np

from ..io.images import ImageReadError, intensity_range, scale_to_unit, validate_image_array


class ImageSource:
    """Rows of a 2-D gray or RGB image, read on demand and mapped to float32 ``[0, 1]``.

    ``array`` may be a numpy array (checked whole, as ``validate_image_array``) or any lazy
    array with ``shape``, ``dtype`` and slicing (dask, zarr, memmap) in ``(H, W)``,
    ``(H, W, 3|4)`` or ``(3|4, H, W)`` layout, with optional leading axes of size 1.
    """

    def __init__(self, array, channels: int):
        self.channels = channels
        if isinstance(array, np.ndarray) or not hasattr(array, "shape"):
            self._array = validate_image_array(np.asarray(array))
            self._channel_first = False
            self._lazy = False
        else:
            self._array, self._channel_first = _lazy_plane(array)
            self._lazy = True
        shape = self._array.shape
        self.height, self.width = (shape[1], shape[2]) if self._channel_first else (shape[0], shape[1])
        self.rgb = len(shape) == 3
        self.value_range = intensity_range(self._array_hwc_rows_view())

    def _array_hwc_rows_view(self):
        return _RowsView(self) if self._channel_first else self._array

    def raw_rows(self, top: int, bottom: int) -> np.ndarray:
        if self._channel_first:
            return np.moveaxis(np.asarray(self._array[:, top:bottom]), 0, -1)
        return np.asarray(self._array[top:bottom])

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as stored (``(h, W)`` or ``(h, W, 3)``), checked for NaN."""
        raw = self.raw_rows(top, bottom)
        if raw.ndim == 3 and raw.shape[-1] == 4:
            raw = raw[..., :3]
        if self._lazy and np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise ImageReadError(f"image: rows {top}-{bottom} contain NaN or infinite pixels.")
        return raw

    def rows01(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``[top, bottom)`` as float32 ``(h, W, channels)`` in ``[0, 1]``."""
        return self.to01(self.rows(top, bottom))

    def to01(self, raw: np.ndarray) -> np.ndarray:
        """Pixels as stored -> float32 ``(..., channels)`` in ``[0, 1]``, with the image's statistics."""
        return scale_to_unit(raw, self.channels, self.value_range)


class _RowsView:
    """A channel-last view of a channel-first lazy array, for row sampling only."""

    def __init__(self, source: ImageSource):
        self._source, self.shape = source, (source.height, source.width, source._array.shape[0])
        self.dtype = source._array.dtype

    def __getitem__(self, rows: slice):
        return self._source.raw_rows(rows.start, rows.stop)


def _lazy_plane(array):
    """(array, channel_first) for a lazy array, without reading pixels; clear errors otherwise."""
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageReadError(f"image: unsupported pixel type {dtype}; expected integer or float pixels.")
    while len(shape) > 3 and shape[0] == 1 or (len(shape) == 3 and shape[0] == 1 and shape[-1] not in (3, 4)):
        array, shape = array[0], shape[1:]
    if len(shape) == 3 and shape[-1] == 1:
        array, shape = array[..., 0], shape[:2]
    channel_first = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
    if not (len(shape) == 2 or (len(shape) == 3 and (shape[-1] in (3, 4) or channel_first))):
        raise ImageReadError(
            f"image: shape {shape} is not a 2-D gray, RGB or RGBA image. Stacks, time series and "
            "multi-channel (>4) data are not supported; segment one 2-D plane at a time."
        )
    h, w = (shape[1], shape[2]) if channel_first else (shape[0], shape[1])
    if h == 0 or w == 0:
        raise ImageReadError(f"image: the image is empty (shape {shape}).")
    return array, channel_first
