"""Files a microscopist brings: fluorescence channels, saved layers reopened, saves that fail."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medseg.io.images import ImageReadError, read_image


def _fluorescence(real_512: np.ndarray, channels: int) -> np.ndarray:
    """``channels`` 16-bit planes made from a real image's colour planes (each its own stain)."""
    planes = [real_512[..., i % 3].astype(np.uint16) * (40 + 30 * i) for i in range(channels)]
    return np.stack(planes)


@pytest.mark.parametrize("kind", ["ome", "imagej"])
def test_four_fluorescence_channels_are_refused_not_taken_for_rgba(tmp_path, real_512, kind):
    """A 4-channel fluorescence TIFF (axes CYX) had been read as RGBA: its 4th stain taken for
    transparency, every pixel of the other three blended towards white. It is refused, saying
    it holds 4 separate channels; an RGBA TIFF (its samples, axis S) still reads."""
    from napari_medseg.io.lazy import open_tiff_lazy

    path = tmp_path / "stains.tif"
    stains = _fluorescence(real_512, 4)
    if kind == "ome":
        tifffile.imwrite(path, stains, ome=True, metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, stains, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ImageReadError, match=r"axes 'CYX'.* not a 2-D gray, RGB or RGBA image.*4 separate channels"):
        read_image(path)
    with pytest.raises(ImageReadError, match="4 separate channels"):
        open_tiff_lazy(path)  # the lazy reading of a large file follows the same rule
    rgba = np.dstack([real_512, np.full(real_512.shape[:2], 255, np.uint8)])
    for planar in ("contig", "separate"):
        tifffile.imwrite(tmp_path / "rgba.tif", rgba if planar == "contig" else np.moveaxis(rgba, -1, 0),
                         photometric="rgb", planarconfig=planar, extrasamples=["unassalpha"])
        assert np.array_equal(read_image(tmp_path / "rgba.tif"), real_512)


@pytest.mark.parametrize("channels", [2, 5])
def test_other_channel_counts_are_named_in_the_message(tmp_path, real_512, channels):
    """Two fluorescence channels were refused as 'multi-channel (>4) data'; the message names
    the channels the file holds and what to save instead."""
    path = tmp_path / "stains.ome.tif"
    tifffile.imwrite(path, _fluorescence(real_512, channels), ome=True, metadata={"axes": "CYX"})
    with pytest.raises(ImageReadError, match=rf"{channels} separate channels .*gray image") as info:
        read_image(path)
    assert ">4" not in str(info.value)


def test_three_channels_apart_still_read_as_rgb(tmp_path, real_512):
    """An RGB image stored channel-first (OME CYX, 3 channels) reads as RGB, as the README says."""
    tifffile.imwrite(tmp_path / "rgb.ome.tif", np.moveaxis(real_512, -1, 0), ome=True, metadata={"axes": "CYX"})
    assert np.array_equal(read_image(tmp_path / "rgb.ome.tif"), real_512)
