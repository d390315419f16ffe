"""A large flat TIFF opens at once: its overview (every 8th pixel of the whole file: 1-7 s for a
20000² RGB one) is read in a thread after napari has added the layer, not on its GUI thread."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

PLUGIN = "napari-medseg"


@pytest.fixture
def flat_tiff(monuseg, tmp_path, monkeypatch):
    """A real 1000² MoNuSeg image as a tiled, compressed single-level TIFF, read as a large one
    (overviews made beyond 200 px instead of 4096, lazily as above 50 Mpx)."""
    import napari_medseg._napari.reader as reader
    import napari_medseg.io.slides as slides
    from napari_medseg.io import read_image
    from napari_medseg.io.lazy import should_open_lazily

    monkeypatch.setattr(reader, "DISPLAY_MAX_SIDE", 200)
    monkeypatch.setattr(slides, "should_open_lazily", lambda path: should_open_lazily(path, min_pixels=1))
    pixels = read_image(sorted((monuseg / "images").glob("*.png"))[0])
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(128, 128), compression="zlib")
    return path, pixels


def test_the_overview_is_read_after_the_layer_is_added(make_napari_viewer, qtbot, flat_tiff):
    path, pixels = flat_tiff
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.multiscale and [level.shape[:2] for level in layer.data] == [(1000, 1000), (500, 500), (250, 250),
                                                                              (125, 125)]
    # not read on the GUI thread while napari opened it (it was: all of the file, before any layer)
    assert not np.asarray(layer.data[-1]).any()
    qtbot.waitUntil(lambda: np.asarray(layer.data[-1]).any(), timeout=20_000)
    qtbot.waitUntil(lambda: np.array_equal(np.asarray(layer.data[-1]), pixels[::8, ::8]), timeout=20_000)
    qtbot.waitUntil(lambda: layer.thumbnail[..., :3].any(), timeout=5_000)  # redrawn as it came


def test_a_large_tiff_whose_bytes_do_not_decode_is_still_refused_at_opening(make_napari_viewer, flat_tiff):
    path, _ = flat_tiff
    with tifffile.TiffFile(path) as tif:
        spans = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset + 2: offset + min(count, 40)] = b"\xff" * (min(count, 40) - 2)
    path.write_bytes(bytes(data))
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(path, plugin=PLUGIN)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert "'flat.tif'" in " | ".join(chain) and "corrupt or truncated" in " | ".join(chain)
    assert len(viewer.layers) == 0
