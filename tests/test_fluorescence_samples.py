"""Fluorescence channels stored side by side in a TIFF (MinIsBlack, several samples per pixel)
are refused with their count, as channels stored apart (a C axis) are: read as RGBA, the 4th
stain became alpha and the image segmented as noise (0 nuclei, no word)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medseg.io.images import ImageReadError, read_image
from napari_medseg.io.lazy import open_tiff_lazy


@pytest.fixture
def four_stains(consep, tmp_path):
    """A real CoNSeP patch's three colours plus a 4th 'stain', 16-bit, as a camera writes them."""
    rgb = read_image(next((consep / "images").glob("*.png"))).astype(np.uint16) * 257
    pixels = np.dstack([rgb, rgb[..., :1] // 2])
    path = tmp_path / "four_stains.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    return path, rgb


def test_four_gray_samples_per_pixel_are_refused_with_their_count(four_stains):
    path, _ = four_stains
    with pytest.raises(ImageReadError, match=r"'four_stains.tif': 4 gray channels per pixel .*nuclear channel"):
        read_image(path)  # was (H, W, 3): the 4th stain taken as alpha
    with pytest.raises(ImageReadError, match="4 gray channels per pixel"):
        open_tiff_lazy(path)


def test_three_gray_samples_still_read_as_rgb_as_three_separate_channels_do(four_stains, tmp_path):
    _, rgb = four_stains
    tifffile.imwrite(tmp_path / "three.tif", rgb, photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(read_image(tmp_path / "three.tif"), rgb)
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, np.full(rgb.shape[:2], 65535, np.uint16)]),
                     photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), rgb)  # real RGBA: as before
