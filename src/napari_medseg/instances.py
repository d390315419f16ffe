"""Class maps -> nucleus instances (marker watershed), and the class of each instance by
majority vote.

Markers come from the distance transform of the predicted foreground or, for models with a
distance head, from the distance map the model predicts: every nucleus's distance to its own
edge, scaled to 1 at its centre (``nucleus_distance_map``). That map drops to 0 where two
nuclei touch, so it separates nuclei whose joint outline is round enough to fool the
foreground's distance transform.

Conventions: instance maps hold non-negative integer ids, 0 = background. Class maps hold
class ids, 0 = background; background pixels never vote for an instance's class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# Instances are derived for images up to this size: the watershed holds float64 maps of the whole image.
INSTANCE_MAX_PIXELS = 64_000_000
# whole-image steps of iter_semantic_to_instances: foreground, distance map, seeds, watershed
INSTANCE_STEPS = 4


class InstanceInputError(ValueError):
    """An instance map or class map cannot be used as given."""


@dataclass
class InstanceSettings:
    # px between two seeds (nucleus centres); smaller splits more. CoNSeP/MoNuSeg are 40x
    # (~0.25 µm/px), where nuclei are 15-40 px across.
    min_distance: int = 4
    # gaussian sigma (px) smoothing the distance map: fewer spurious seeds on ragged edges; 0 = off
    sigma: float = 1.0
    # objects smaller than this many px are dropped as noise (0 or 1 keeps everything)
    min_size: int = 10
    # fill background regions enclosed by foreground (nuclei are solid; holes are prediction noise)
    fill_holes: bool = True
    # with a predicted distance map: seeds are its connected regions above this value (a
    # nucleus core), dropped when smaller than min_marker_size px
    marker_threshold: float = 0.5
    min_marker_size: int = 4


def _check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise InstanceInputError(f"The {name} must hold integer ids, not {ids.dtype}.")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and ids.min() < 0:
        raise InstanceInputError(f"The {name} holds negative ids (min {int(ids.min())}); ids must be >= 0.")
    return ids


def table_size_ok(top: int, size: int) -> bool:
    """Whether ids up to ``top`` may index a table directly (else relabel them 1..N first)."""
    return top < 2**31 and top <= 4 * size + 65536


def semantic_to_instances(class_map: np.ndarray, settings: InstanceSettings | None = None,
                          distance: np.ndarray | None = None) -> np.ndarray:
    """Split the foreground (class > 0) into nuclei: int32 ids > 0 (not always consecutive:
    seeds dropped by the watershed leave gaps), 0 = background.

    See ``iter_semantic_to_instances``, which this runs to the end.
    """
    steps = iter_semantic_to_instances(class_map, settings, distance)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


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
    connected component yields at least one instance.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    s = settings or InstanceSettings()
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise InstanceInputError(f"Instances are derived from 2-D class maps, got shape {class_map.shape}.")
    if not (np.issubdtype(class_map.dtype, np.integer) or class_map.dtype == bool):
        raise InstanceInputError(f"The class map must hold integer class ids, not {class_map.dtype}.")
    foreground = class_map > 0
    if s.fill_holes:
        foreground = ndi.binary_fill_holes(foreground)
    components, n = ndi.label(foreground)  # 4-connectivity, as the watershed below
    if n and s.min_size > 1:
        keep = np.bincount(components.ravel(), minlength=n + 1) >= s.min_size
        keep[0] = False
        if not keep[1:].all():
            foreground = keep[components]
            components, n = ndi.label(foreground)
    if n == 0:
        yield INSTANCE_STEPS, INSTANCE_STEPS  # nothing to split: every step is done
        return np.zeros(class_map.shape, np.int32)
    yield 1, INSTANCE_STEPS
    if distance is None:
        distance = ndi.distance_transform_edt(foreground)
        if s.sigma > 0:
            distance = ndi.gaussian_filter(distance, s.sigma)
        yield 2, INSTANCE_STEPS
        peaks = peak_local_max(distance, min_distance=max(1, int(s.min_distance)), labels=components,
                               exclude_border=False)
        markers = np.zeros(class_map.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    else:
        distance = np.asarray(distance, np.float32)
        if distance.shape != class_map.shape:
            raise InstanceInputError(f"The distance map {distance.shape} and the class map {class_map.shape} differ in shape.")
        yield 2, INSTANCE_STEPS
        markers, _ = ndi.label(foreground & (distance > s.marker_threshold))
        if s.min_marker_size > 1 and markers.max():
            small = np.bincount(markers.ravel()) < s.min_marker_size
            small[0] = False
            markers[small[markers]] = 0
    # components without a seed (tiny or flat) get one at their own maximum
    seeded = np.zeros(n + 1, bool)
    seeded[components[markers > 0]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        top = int(markers.max())
        where = ndi.maximum_position(distance, components, missing)
        for k, pos in enumerate(where, start=top + 1):
            markers[pos] = k
    yield 3, INSTANCE_STEPS
    instances = watershed(-distance, markers, mask=foreground)
    yield 4, INSTANCE_STEPS
    return instances.astype(np.int32, copy=False)


def nucleus_distance_map(instances: np.ndarray) -> np.ndarray:
    """Every instance's Euclidean distance to its own edge, divided by its maximum: float32 in
    [0, 1], 1 at each nucleus's centre, falling to 0 at its outline (also where it touches
    another nucleus); 0 on background. The training target of a model's distance head.
    """
    from scipy import ndimage as ndi

    instances = _check_ids("instance map", instances)
    if instances.ndim != 2:
        raise InstanceInputError(f"Distance maps are made from 2-D instance maps, got shape {instances.shape}.")
    out = np.zeros(instances.shape, np.float32)
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        # one pixel of margin, so an instance touching the crop's edge still has an outside
        grown = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        inside = instances[grown] == index
        dist = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        top = dist.max()
        if top > 0:
            region = out[grown]
            region[inside] = (dist[inside] / top).astype(np.float32)
    return out


def instance_classes(instances: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """``votes[id]`` = the majority class of instance ``id``, for ids 0..max (int64).

    One ``np.bincount`` of ``id * C + class`` over the instance pixels. Background pixels
    (class 0) do not vote; ties go to the lower class id; ids that do not occur, id 0 and
    instances with no foreground pixel get 0. Ids must be small enough to index an array
    (see ``table_size_ok``); relabel huge ids with ``skimage.segmentation.relabel_sequential``.
    """
    instances = _check_ids("instance map", instances)
    class_map = _check_ids("class map", class_map)
    if instances.shape != class_map.shape:
        raise InstanceInputError(f"Instance map {instances.shape} and class map {class_map.shape} differ in shape.")
    n_ids = int(instances.max(initial=0)) + 1
    if not table_size_ok(n_ids - 1, instances.size):
        raise InstanceInputError(
            f"Instance ids go up to {n_ids - 1}, too large to index a table for {instances.size} pixels; "
            "relabel them first (skimage.segmentation.relabel_sequential)."
        )
    n_classes = int(class_map.max(initial=0)) + 1
    keep = (instances > 0) & (class_map > 0)
    codes = instances[keep].astype(np.intp) * n_classes + class_map[keep].astype(np.intp)
    counts = np.bincount(codes, minlength=n_ids * n_classes).reshape(n_ids, n_classes)
    votes = counts.argmax(1)  # argmax returns the first (lowest) class on ties
    votes[counts.max(1) == 0] = 0
    return votes.astype(np.int64, copy=False)


def classify_instances(instances: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """The class map rewritten so every instance carries its majority class.

    Pixels of an instance all get its vote (an instance without any foreground pixel becomes
    background); pixels outside every instance keep their class. Same dtype as ``class_map``.
    """
    instances = _check_ids("instance map", instances)
    class_map = _check_ids("class map", class_map)
    if instances.shape != class_map.shape:
        raise InstanceInputError(f"Instance map {instances.shape} and class map {class_map.shape} differ in shape.")
    if not table_size_ok(int(instances.max(initial=0)), instances.size):
        from skimage.segmentation import relabel_sequential

        instances = relabel_sequential(instances)[0]
    votes = instance_classes(instances, class_map)
    out = class_map.copy()
    inside = instances > 0
    out[inside] = votes[instances[inside]].astype(class_map.dtype)
    return out
