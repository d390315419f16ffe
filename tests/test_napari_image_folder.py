"""A plain folder of images dropped on napari (no labels/ beside them, not a PanNuke fold): each
image a layer of its own, as if the files had been dropped together. napari had said only that no
reader was found for it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_medseg.io import read_image

PLUGIN = "napari-medseg"


def test_a_plain_folder_of_images_opens_one_layer_per_image(make_napari_viewer, consep, tmp_path):
    sources = sorted((consep / "images").glob("*.png"))[:2]
    for source in sources:
        shutil.copy(source, tmp_path / source.name)
    (tmp_path / "notes.txt").write_text("scanned 2026-11-30")  # not an image: left alone
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path), plugin=PLUGIN)
    assert [layer.name for layer in layers] == [s.stem for s in sources]
    for layer, source in zip(layers, sources):
        assert layer.rgb and np.array_equal(layer.data, read_image(source))


def test_a_folder_of_too_many_images_says_how_else_to_use_it(make_napari_viewer, tmp_path):
    import imageio.v3 as iio

    from napari_medseg._napari.reader import FOLDER_MAX_IMAGES, get_reader

    for i in range(FOLDER_MAX_IMAGES + 1):
        iio.imwrite(tmp_path / f"tile_{i:03d}.png", np.full((8, 8, 3), i, np.uint8))
    with pytest.raises(ValueError, match=rf"holds {FOLDER_MAX_IMAGES + 1} images.*medseg predict"):
        get_reader(str(tmp_path))(str(tmp_path))
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="medseg predict"):
        viewer.open(str(tmp_path), plugin=PLUGIN)
    assert len(viewer.layers) == 0
