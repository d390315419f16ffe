"""`medseg predict` and the Python API as a new user meets them: the file's pixel size, what an
output folder holds when nothing could be segmented, and messages for the user's mistakes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tifffile

from hostile import assert_refused, medseg
from napari_medseg.inference import Segmenter, TileSettings, segment_file
from napari_medseg.io import read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def at_40x(segmenter) -> Segmenter:
    """The tiny test model, told it was trained at 0.25 µm/px."""
    return Segmenter(segmenter.model, replace(segmenter.meta, pixel_size_um=0.25), segmenter.device)


def test_segment_file_uses_the_pixel_size_the_file_records(at_40x, consep, tmp_path):
    """A 20x TIFF (0.5 µm/px in its resolution tags) through ``segment_file`` is segmented at the
    model's pixel size, as ``medseg predict`` segments it (it had been taken as 40x)."""
    image = read_image(consep / "images" / "train_2_006.png")
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    settings = TileSettings(128, 32)
    expected = at_40x.segment(image, settings, pixel_size_um=0.5)
    labels = segment_file(path, at_40x, settings)
    assert any("resampled x2" in note for note in at_40x.last_report.notes), at_40x.last_report.notes
    assert labels.shape == image.shape[:2] and np.array_equal(labels, expected)
    # told otherwise, the caller wins
    assert np.array_equal(segment_file(path, at_40x, settings, pixel_size_um=0.25), at_40x.segment(image, settings))
