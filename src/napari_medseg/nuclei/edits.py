"""Nuclei that follow a class map painted by hand.

A user who erases a false nucleus from Segment's class map, or paints one it missed, expects the
nuclei scored beside it to change by that nucleus only. Deriving all of them anew from the edited
class map (a plain watershed, not the model's distance-map seeds) had moved bPQ by 0.05 for one
117 px erasure: the method changed, not the edit.
"""

from __future__ import annotations

import numpy as np


def nuclei_following(nuclei: np.ndarray, class_map: np.ndarray, before: np.ndarray | None) -> np.ndarray:
    """``nuclei`` after the class map under them was painted: each keeps its pixels where the map
    still names a nucleus class (an erased one goes), and each piece of nucleus pixels painted
    where ``before`` (the map's nucleus pixels when the nuclei were made; ``None``: unknown, no
    piece added) had none is a nucleus of its own, as drawn (8-connected). Nucleus pixels the
    nuclei left out from the start (specks under the smallest nucleus) stay out."""
    from scipy import ndimage as ndi

    foreground = np.asarray(class_map) > 0
    kept = np.where(foreground, nuclei, 0)
    if before is None:
        return kept
    new = foreground & ~np.asarray(before, bool) & (kept == 0)
    if new.any():
        pieces, _ = ndi.label(new, structure=np.ones((3, 3), bool))
        kept[new] = pieces[new] + int(np.max(nuclei, initial=0))  # ids never reused: an erased one stays gone
    return kept
