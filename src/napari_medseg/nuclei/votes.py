"""The class of each nucleus: a majority vote of its pixels in a class map.

Conventions: instance maps hold non-negative integer ids, 0 = background. Class maps hold
class ids, 0 = background; background pixels never vote for an instance's class.
"""

from __future__ import annotations

import numpy as np

from ..errors import MedsegError


class InstanceInputError(MedsegError, ValueError):
    """An instance map or class map cannot be used as given."""


def check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise InstanceInputError(f"The {name} must hold integer ids, not {ids.dtype}.")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and ids.min() < 0:
        raise InstanceInputError(f"The {name} holds negative ids (min {int(ids.min())}); ids must be >= 0.")
    return ids


def table_size_ok(top: int, size: int) -> bool:
    """Whether ids up to ``top`` may index a table directly (else relabel them 1..N first)."""
    return top < 2**31 and top <= 4 * size + 65536


def instance_classes(instances: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """``votes[id]`` = the majority class of instance ``id``, for ids 0..max (int64).

    One ``np.bincount`` of ``id * C + class`` over the instance pixels. Background pixels
    (class 0) do not vote; ties go to the lower class id; ids that do not occur, id 0 and
    instances with no foreground pixel get 0. Ids must be small enough to index an array
    (see ``table_size_ok``); relabel huge ids with ``skimage.segmentation.relabel_sequential``.
    """
    instances = check_ids("instance map", instances)
    class_map = check_ids("class map", class_map)
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
    instances = check_ids("instance map", instances)
    class_map = check_ids("class map", class_map)
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
