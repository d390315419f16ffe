"""Objects of a binary mask: the one rule for dropping specks.

Objects are 4-connected (``scipy.ndimage.label``'s default in 2-D), as the watershed's regions.
"""

from __future__ import annotations

import numpy as np


def without_small_objects(mask: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(kept, components, n)``: ``mask`` without its objects under ``min_size`` px, and the
    labelled objects that are kept (ids 1..n). ``min_size`` 0 or 1 keeps every object."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, bool)
    components, n = ndi.label(mask)
    if n and min_size > 1:
        keep = np.bincount(components.ravel(), minlength=n + 1) >= min_size
        keep[0] = False
        if not keep[1:].all():
            mask = keep[components]
            components, n = ndi.label(mask)
    return mask, components, n
