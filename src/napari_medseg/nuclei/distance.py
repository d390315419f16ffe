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
