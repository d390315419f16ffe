"""A nucleus distance map: the training target of a model's distance head.

Every nucleus's distance to its own edge, scaled to 1 at its centre. It drops to 0 where two
nuclei touch, so its cores separate nuclei whose joint outline is round enough to fool the
distance transform of the foreground.
"""

from __future__ import annotations

import numpy as np

from .votes import InstanceInputError, check_ids


def nucleus_distance_map(instances: np.ndarray) -> np.ndarray:
    """Every instance's Euclidean distance to its own edge, divided by its maximum: float32 in
    [0, 1], 1 at each nucleus's centre, falling to 0 at its outline (also where it touches
    another nucleus); 0 on background. The training target of a model's distance head.
    """
    from scipy import ndimage as ndi

    instances = check_ids("instance map", instances)
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


# px: how far into each of two touching nuclei the loss weighs more (training.config's
# distance_touch_weight); at 0.25 µm/px the neck between two nuclei, ~0.5 µm each side
TOUCH_RADIUS_PX = 2


def touching_pixels(instances: np.ndarray, radius: int = TOUCH_RADIUS_PX) -> np.ndarray:
    """bool ``(H, W)``: the pixels of each nucleus within ``radius`` px (chessboard) of another
    nucleus's pixel: the neck where two touching nuclei meet, which their distance map's cores
    must leave apart (two cores joined there make one seed, and the watershed one nucleus)."""
    from scipy import ndimage as ndi

    ids = check_ids("instance map", instances).astype(np.int64, copy=False)
    if ids.ndim != 2:
        raise InstanceInputError(f"Touching nuclei are found in 2-D instance maps, got shape {ids.shape}.")
    size = 2 * int(radius) + 1
    # a pixel sees another nucleus when the largest or the smallest non-zero id around it is not its own
    largest = ndi.maximum_filter(ids, size=size, mode="constant", cval=0)
    none = int(ids.max(initial=0)) + 1  # above every id (scipy's cval passes through a float: keep it small)
    smallest = ndi.minimum_filter(np.where(ids > 0, ids, none), size=size, mode="constant", cval=none)
    return (ids > 0) & ((largest != ids) | (smallest != ids))
