"""Which class a pixel is named, from the blended probabilities: numpy only, so that what
re-decides a kept run's classes (a new threshold, class weights) needs no deep-learning runtime."""

from __future__ import annotations

import numpy as np


def classify(probs: np.ndarray, foreground_threshold: float | None = None,
             class_weights: np.ndarray | list[float] | None = None) -> np.ndarray:
    """Class ids from probabilities ``(C, ...)``: the argmax, or, with ``foreground_threshold``,
    the likeliest foreground class where the foreground probability ``1 - p[0]`` exceeds the
    threshold and background elsewhere (a tuned operating point, e.g. for under-calling models).

    ``class_weights``: see ``foreground_class``; which pixels are foreground is decided without
    them, so nucleus masks and instances stay the same.
    """
    weighted = class_weights is not None and len(class_weights) > 0
    if probs.shape[0] < 2 or (foreground_threshold is None and not weighted):
        return probs.argmax(0)
    foreground = probs.argmax(0) > 0 if foreground_threshold is None else 1.0 - probs[0] > foreground_threshold
    return np.where(foreground, foreground_class(probs, class_weights), 0)


def foreground_class(probs: np.ndarray, class_weights: np.ndarray | list[float] | None = None) -> np.ndarray:
    """The likeliest foreground class (1..C-1) of every pixel of ``probs`` ``(C, ...)``, each
    foreground class's probability scaled by its weight in ``class_weights`` (one per
    foreground class, ``CheckpointMeta.class_choice_weights``) where given."""
    foreground = probs[1:]
    if class_weights is not None and len(class_weights):
        foreground = foreground * np.asarray(class_weights, np.float32).reshape((-1,) + (1,) * (probs.ndim - 1))
    return foreground.argmax(0) + 1
