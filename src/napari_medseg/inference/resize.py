"""Bilinear resizing without torch, as ``torch.nn.functional.interpolate`` does it.

``rescale`` resamples images to the model's pixel size and the outputs back. A slide run's
process that runs the network through an ONNX runtime never imports torch (half a GB of memory
less), so there the resampling is done here, one axis after the other: bilinear with pixel
centres at half-integers (``align_corners=False``) when enlarging, and the triangle filter
stretched over the source pixels (torch's and Pillow's ``antialias``) when shrinking. The
outputs equal torch's to float rounding (``tests/test_resize.py``); torch's multithreaded kernel
is 3-4x faster, so it is used wherever torch is already loaded.
"""

from __future__ import annotations

import numpy as np


def axis_taps(size_in: int, size_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(taps, weights)``, both ``(size_out, k)``: output ``i`` is the weighted sum of input
    samples ``taps[i]`` (weights of unused taps are 0)."""
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale  # output pixel centres, in input coordinates
    if antialias and scale > 1.0:
        # the triangle filter stretched to ``scale`` input pixels a side, cut at the edges, renormalised
        first = np.maximum(np.floor(centres - scale + 0.5).astype(np.int64), 0)
        last = np.minimum(np.floor(centres + scale + 0.5).astype(np.int64), size_in)
        taps = first[:, None] + np.arange(int((last - first).max()))[None, :]
        weights = np.clip(1.0 - np.abs((taps + 0.5 - centres[:, None]) / scale), 0.0, None)
        weights[taps >= last[:, None]] = 0.0
        weights /= weights.sum(1, keepdims=True)
        return np.minimum(taps, size_in - 1), weights.astype(np.float32)
    # plain bilinear: the two nearest input samples, the position clamped at the first one
    position = np.maximum(centres - 0.5, 0.0)
    left = np.minimum(np.floor(position).astype(np.int64), size_in - 1)
    fraction = position - left
    taps = np.stack([left, np.minimum(left + 1, size_in - 1)], 1)
    return taps, np.stack([1.0 - fraction, fraction], 1).astype(np.float32)


def _along(array: np.ndarray, size_out: int, axis: int, antialias: bool) -> np.ndarray:
    """``array`` resized along ``axis`` (float32)."""
    if array.shape[axis] == size_out:
        return array
    taps, weights = axis_taps(array.shape[axis], size_out, antialias)
    shape = [1] * array.ndim
    shape[axis] = size_out
    out = None
    for k in range(taps.shape[1]):
        part = np.take(array, taps[:, k], axis=axis)
        part *= weights[:, k].reshape(shape)
        out = part if out is None else np.add(out, part, out=out)
    return out


def resize_bilinear(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float ``(C, H, W)`` array resized to ``(C, *shape)``, float32: bilinear, averaged over
    the source pixels along both axes when either shrinks (torch's ``antialias``)."""
    array = np.asarray(array, np.float32)
    shrinking = shape[0] < array.shape[1] or shape[1] < array.shape[2]
    # the axis that shrinks more first: the second pass then works on the smaller array
    if shape[0] / array.shape[1] <= shape[1] / array.shape[2]:
        return _along(_along(array, shape[0], 1, shrinking), shape[1], 2, shrinking)
    return _along(_along(array, shape[1], 2, shrinking), shape[0], 1, shrinking)
