"""Nuclei that follow a class map painted by hand (``nuclei.edits``)."""

from __future__ import annotations

import numpy as np

from napari_medseg.nuclei.edits import nuclei_following


def test_an_erased_nucleus_goes_a_painted_one_comes_and_the_others_stay():
    nuclei = np.zeros((20, 20), np.int32)
    nuclei[2:6, 2:6], nuclei[10:14, 10:14] = 1, 7
    class_map = (nuclei > 0).astype(np.uint8) * 3
    class_map[0, 19] = 1  # a speck the nuclei left out from the start
    before = class_map > 0
    class_map[10:14, 10:14] = 0  # nucleus 7 erased
    class_map[2:4, 2:4] = 0  # part of nucleus 1 erased: the rest stays nucleus 1
    class_map[15:18, 1:4] = 2  # a nucleus painted where none was
    followed = nuclei_following(nuclei, class_map, before)
    assert set(np.unique(followed)) == {0, 1, 8}  # the new one takes an id never used: 7 stays gone
    assert (followed == 1).sum() == 16 - 4 and (followed == 8).sum() == 9
    assert not followed[class_map == 0].any() and followed[0, 19] == 0  # the speck is still no nucleus
    np.testing.assert_array_equal(nuclei_following(nuclei, before, before), nuclei)  # no edit, no change
    assert set(np.unique(nuclei_following(nuclei, class_map, None))) == {0, 1}  # before unknown: erasures only
