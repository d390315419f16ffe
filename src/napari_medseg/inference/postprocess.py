"""Clean-up of a predicted class map: drop specks, fill small holes — in blocks, so a
whole-slide map is never copied or labelled at once.

Both operations are local: an object smaller than ``n`` pixels spans fewer than ``n`` rows,
and so does a hole smaller than ``n`` pixels. A block extended by a halo of ``n`` rows
therefore sees every small object or hole that touches its core whole, and anything that
reaches the halo's edge is at least ``n`` pixels large and left alone. The result is the same
as on the whole map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..nuclei.masks import without_small_objects


@dataclass
class PostprocessSettings:
    min_object_size: int = 0  # px: foreground objects smaller than this become background; 0 = off
    max_hole_size: int = 0  # px: background holes up to this size inside nuclei are filled; 0 = off

    @property
    def active(self) -> bool:
        return self.min_object_size > 1 or self.max_hole_size > 0


def _clean_block(block: np.ndarray, settings: PostprocessSettings) -> np.ndarray:
    from scipy import ndimage as ndi

    out = block.copy()
    if settings.min_object_size > 1:
        kept = without_small_objects(out > 0, settings.min_object_size)[0]
        out[~kept] = 0
    if settings.max_hole_size > 0:
        background, n = ndi.label(out == 0)
        if n:
            sizes = np.bincount(background.ravel(), minlength=n + 1)
            # a hole does not touch the block border (the halo rule above makes that exact)
            border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
            fill = sizes <= settings.max_hole_size
            fill[0] = False
            fill[border] = False
            holes = fill[background]
            if holes.any():
                # each hole pixel takes the class of its nearest nucleus pixel
                _, nearest = ndi.distance_transform_edt(out == 0, return_indices=True)
                out[holes] = out[nearest[0][holes], nearest[1][holes]]
    return out


def postprocess_class_map(class_map, settings: PostprocessSettings, block_rows: int = 2048):
    """Clean ``class_map`` in place (any writable array: numpy, memmap, zarr) and return it."""
    if not settings.active:
        return class_map
    height = class_map.shape[0]
    halo = max(settings.min_object_size, settings.max_hole_size) + 1
    for top in range(0, height, block_rows):
        bottom = min(height, top + block_rows)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        block = np.asarray(class_map[lo:hi])
        cleaned = _clean_block(block, settings)
        # a hole touching an extended block's edge that is the image's edge is not a hole
        class_map[top:bottom] = cleaned[top - lo:bottom - lo]
    return class_map
