"""A gray image with an alpha channel reads the same from a TIFF as from a PNG: its gray."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image


@pytest.fixture
def gray_alpha(consep, tmp_path):
    """A real CoNSeP patch as gray + alpha (its top rows transparent), as a PNG and a TIFF."""
    gray = np.asarray(Image.open(consep / "images" / "train_1_005.png").convert("L"))
    alpha = np.full_like(gray, 255)
    alpha[:20] = 0
    pixels = np.dstack([gray, alpha])
    Image.fromarray(pixels, "LA").save(tmp_path / "la.png")
    Image.fromarray(pixels, "LA").save(tmp_path / "pillow_la.tif")
    tifffile.imwrite(tmp_path / "la.tif", pixels, photometric="minisblack", extrasamples=["unassalpha"])
    return gray, tmp_path


def test_a_gray_alpha_tiff_reads_as_its_png_does(gray_alpha):
    from napari_medseg.io.images import read_image

    gray, folder = gray_alpha
    png = read_image(folder / "la.png")
    for name in ("la.tif", "pillow_la.tif"):
        tif = read_image(folder / name)  # was refused: "shape (256, 256, 2) ... is not a 2-D gray, RGB or RGBA image"
        np.testing.assert_array_equal(tif, png)
    np.testing.assert_array_equal(png, gray)


def test_a_large_gray_alpha_tiff_opens_lazily_as_gray(gray_alpha):
    from napari_medseg.io.images import read_image
    from napari_medseg.io.lazy import open_tiff_lazy

    gray, folder = gray_alpha
    levels = open_tiff_lazy(folder / "la.tif")
    assert len(levels) == 1 and levels[0].shape == gray.shape
    np.testing.assert_array_equal(np.asarray(levels[0]), read_image(folder / "la.tif"))


def test_two_channels_without_alpha_are_still_refused(consep, tmp_path):
    from napari_medseg.io.images import ImageReadError, read_image

    gray = np.asarray(Image.open(consep / "images" / "train_1_005.png").convert("L"))
    tifffile.imwrite(tmp_path / "two.tif", np.dstack([gray, gray]), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match="not a 2-D gray, RGB or RGBA image"):
        read_image(tmp_path / "two.tif")


def test_a_gray_alpha_tiff_opens_in_napari_as_its_png(make_napari_viewer, gray_alpha):
    gray, folder = gray_alpha
    viewer = make_napari_viewer()
    png = viewer.open(folder / "la.png", plugin="napari-medseg")[0]
    tif = viewer.open(folder / "la.tif", plugin="napari-medseg")[0]
    assert tif.rgb is False and tif.data.shape == gray.shape
    np.testing.assert_array_equal(np.asarray(tif.data), np.asarray(png.data))
