"""Class maps -> nucleus instances by a marker watershed.

Markers come from the distance transform of the predicted foreground or, for models with a
distance head, from the distance map the model predicts (``nuclei.distance``): its cores
above ``marker_threshold`` are one seed per nucleus even where nuclei touch.

Instance maps hold non-negative integer ids, 0 = background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..steps import run_steps
from .masks import without_small_objects
from .votes import InstanceInputError


# Instances are derived for images up to this size: the watershed holds float64 maps of the whole image.
INSTANCE_MAX_PIXELS = 64_000_000


# whole-image steps of iter_semantic_to_instances: foreground, distance map, seeds, watershed
INSTANCE_STEPS = 4


@dataclass
class InstanceSettings:
    # px between two seeds (nucleus centres); smaller splits more. CoNSeP/MoNuSeg are 40x
    # (~0.25 µm/px), where nuclei are 15-40 px across.
    min_distance: int = 4
    # gaussian sigma (px) smoothing the distance map: fewer spurious seeds on ragged edges; 0 = off
    sigma: float = 1.0
    # objects smaller than this many px are dropped as noise (0 or 1 keeps everything); 45 px is
    # 2.8 µm² at 0.25 µm/px, below any real nucleus
    min_size: int = 45
    # fill background regions enclosed by foreground (nuclei are solid; holes are prediction noise)
    fill_holes: bool = True
    # with a predicted distance map: seeds are its connected regions above this value (a
    # nucleus core), dropped when smaller than min_marker_size px
    marker_threshold: float = 0.4
    min_marker_size: int = 10
    # min_size, marker_threshold, min_marker_size: chosen for the shipped model by
    # benchmarks/tune_instances.py (the weakest set's bPQ on training images; README, Accuracy);
    # a checkpoint may record its own (``medseg tune-nuclei``), which then replace these

    def errors(self) -> list[str]:
        """What is wrong with these values, by field (empty when they can work)."""
        wrong = [f"{name} must be a whole number of px, got {getattr(self, name)!r}"
                 for name in ("min_distance", "min_size", "min_marker_size") if not _is_int(getattr(self, name))]
        wrong += [f"{name} must be a number, got {getattr(self, name)!r}"
                  for name in ("sigma", "marker_threshold") if not _is_number(getattr(self, name))]
        if wrong:
            return wrong
        if not 0 < self.marker_threshold < 1:
            wrong.append(f"marker_threshold must lie strictly between 0 and 1, got {self.marker_threshold!r}")
        if self.min_distance < 1:
            wrong.append(f"min_distance must be at least 1 px, got {self.min_distance!r}")
        if self.sigma < 0:
            wrong.append(f"sigma must not be negative, got {self.sigma!r}")
        wrong += [f"{name} must not be negative, got {getattr(self, name)!r}"
                  for name in ("min_size", "min_marker_size") if getattr(self, name) < 0]
        return wrong

    @classmethod
    def recorded(cls, record: dict | None) -> "InstanceSettings":
        """These defaults with a model's recorded values (``CheckpointMeta.instance_settings``)."""
        return cls(**(record or {}))


# what a model may record for itself (models.checkpoint.RECORDED_INSTANCE_FIELDS) and medseg
# tune-nuclei chooses
TUNED_FIELDS = ("marker_threshold", "min_size", "min_marker_size")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


def semantic_to_instances(class_map: np.ndarray, settings: InstanceSettings | None = None,
                          distance: np.ndarray | None = None) -> np.ndarray:
    """Split the foreground (class > 0) into nuclei: int32 ids 1..N (consecutive, so the largest
    id is the number of nuclei), 0 = background.

    See ``iter_semantic_to_instances``, which this runs to the end.
    """
    return run_steps(iter_semantic_to_instances(class_map, settings, distance))


def iter_semantic_to_instances(class_map: np.ndarray, settings: InstanceSettings | None = None,
                               distance: np.ndarray | None = None):
    """Generator: yields ``(step, INSTANCE_STEPS)`` after each of its whole-image steps
    (foreground, distance map, seeds, watershed), so a caller can report progress and stop
    between them (each takes seconds near ``INSTANCE_MAX_PIXELS``); returns the instance map.

    Foreground (optionally hole-filled, objects under ``min_size`` px removed) -> a distance
    map -> seeds -> watershed of the negated distance, restricted to the foreground.
    Without ``distance``: the Euclidean distance transform of the foreground, smoothed by
    ``sigma``, seeded at its local maxima at least ``min_distance`` apart. With ``distance``
    (a model's predicted nucleus distance map, ``(H, W)`` in [0, 1]): seeded at its regions
    above ``marker_threshold``. A component without a seed gets one at its maximum, so every
    connected component yields at least one instance. Ids run 1..N without gaps (seeds dropped
    as too small leave none: a count by ``max()`` had been off, 407 for 397 nuclei on a MoNuSeg image).
    """
    from skimage.segmentation import watershed

    s = settings or InstanceSettings()
    class_map = _checked_class_map(class_map)
    foreground, components, n = _foreground(class_map, s)
    if n == 0:
        yield INSTANCE_STEPS, INSTANCE_STEPS  # nothing to split: every step is done
        return np.zeros(class_map.shape, np.int32)
    yield 1, INSTANCE_STEPS
    if distance is None:
        distance = _smoothed_distance_transform(foreground, s.sigma)
        yield 2, INSTANCE_STEPS
        markers = _peak_seeds(distance, components, s.min_distance)
    else:
        distance = np.asarray(distance, np.float32)
        if distance.shape != class_map.shape:
            raise InstanceInputError(f"The distance map {distance.shape} and the class map {class_map.shape} differ in shape.")
        yield 2, INSTANCE_STEPS
        markers = _core_seeds(foreground & (distance > s.marker_threshold), s.min_marker_size)
    _seed_unseeded_components(markers, components, n, distance)
    yield 3, INSTANCE_STEPS
    instances = watershed(-distance, markers, mask=foreground)
    yield 4, INSTANCE_STEPS
    return consecutive_ids(instances.astype(np.int32, copy=False))


def consecutive_ids(instances: np.ndarray) -> np.ndarray:
    """``instances`` with its ids renumbered 1..N in the order of the old ids (in place where any is
    missing; as given where none is). Seeds are numbered without gaps, so this is a check that
    costs one ``bincount``; it renumbers only if a seed was lost on the way."""
    top = int(instances.max(initial=0))
    if top == 0:
        return instances
    present = np.bincount(instances.ravel(), minlength=top + 1) > 0
    present[0] = False
    if present[1:].all():
        return instances
    lookup = np.zeros(top + 1, instances.dtype)
    lookup[present] = np.arange(1, int(present.sum()) + 1, dtype=instances.dtype)
    instances[...] = lookup[instances]
    return instances


def _checked_class_map(class_map) -> np.ndarray:
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise InstanceInputError(f"Instances are derived from 2-D class maps, got shape {class_map.shape}.")
    if not (np.issubdtype(class_map.dtype, np.integer) or class_map.dtype == bool):
        raise InstanceInputError(f"The class map must hold integer class ids, not {class_map.dtype}.")
    return class_map


def _foreground(class_map: np.ndarray, s: InstanceSettings) -> tuple[np.ndarray, np.ndarray, int]:
    """``(foreground, its components, their count)``: holes filled, specks dropped, per ``s``."""
    from scipy import ndimage as ndi

    foreground = class_map > 0
    if s.fill_holes:
        foreground = ndi.binary_fill_holes(foreground)
    return without_small_objects(foreground, s.min_size)


def _smoothed_distance_transform(foreground: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    distance = ndi.distance_transform_edt(foreground)
    return ndi.gaussian_filter(distance, sigma) if sigma > 0 else distance


def _peak_seeds(distance: np.ndarray, components: np.ndarray, min_distance: int) -> np.ndarray:
    """One seed (id 1..k) at each local maximum of ``distance``, at least ``min_distance`` px apart."""
    from skimage.feature import peak_local_max

    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance)), labels=components, exclude_border=False)
    markers = np.zeros(distance.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return markers


def _core_seeds(cores: np.ndarray, min_size: int) -> np.ndarray:
    """One seed per nucleus core of at least ``min_size`` px, numbered 1..k (a dropped core's id
    is given to the next: no gaps)."""
    from scipy import ndimage as ndi

    markers, n = ndi.label(cores)
    if min_size > 1 and n:
        keep = np.bincount(markers.ravel(), minlength=n + 1) >= min_size
        keep[0] = False
        if not keep[1:].all():
            lookup = np.zeros(n + 1, markers.dtype)
            lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=markers.dtype)
            markers = lookup[markers]
    return markers


def _seed_unseeded_components(markers: np.ndarray, components: np.ndarray, n: int, distance: np.ndarray) -> None:
    """Components without a seed (tiny or flat) get one at their own maximum, in place: every
    component yields at least one nucleus."""
    from scipy import ndimage as ndi

    seeded = np.zeros(n + 1, bool)
    seeded[components[markers > 0]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        top = int(markers.max())
        for k, pos in enumerate(ndi.maximum_position(distance, components, missing), start=top + 1):
            markers[pos] = k
