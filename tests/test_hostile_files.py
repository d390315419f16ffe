"""Hostile image files, made here from real TIFFs: cut short, with a header that promises more
than the file holds, or with bytes that do not decode. Every reader (eager, lazy, ``medseg
predict``, napari's File > Open, the Segment widget) refuses them with one message naming the
file, writes nothing and adds no layer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from hostile import assert_refused, medseg, model, no_temp_files, tree  # noqa: F401 (fixtures)

from napari_medseg.io import ImageReadError, read_image
from napari_medseg.io.lazy import open_tiff_lazy

PLUGIN = "napari-medseg"
PIXELS = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)
# what each kind of damage is called in the message, besides the file's name
MESSAGE = r"(corrupt or truncated|corrupt, truncated)"


def _cut(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # the header still promises every strip or tile


def _garble(path, page=None):
    """Bytes that do not decode in every tile or strip of ``page`` (the first page by default)."""
    with tifffile.TiffFile(path) as tif:
        page = page(tif) if page else tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset + 2: offset + min(count, 40)] = b"\xff" * (min(count, 40) - 2)
    path.write_bytes(bytes(data))


def _taller(path):
    """A header that says the image is 4 times taller than the tiles the file lists."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageLength"].overwrite(PIXELS.shape[0] * 4)


def bad_tiff(path, damage: str):
    """A real RGB TIFF of ``PIXELS``, then damaged: see the module doc."""
    if damage == "cut single strip":  # tifffile's default: uncompressed, one strip
        tifffile.imwrite(path, PIXELS, photometric="rgb")
        _cut(path)
    elif damage == "cut tiles":
        tifffile.imwrite(path, PIXELS, photometric="rgb", tile=(64, 64), compression="zlib")
        _cut(path)
    elif damage == "header taller than data":  # tifffile alone filled the rest with zeros: a wrong image
        tifffile.imwrite(path, PIXELS, photometric="rgb", tile=(64, 64))
        _taller(path)
    elif damage == "bytes that do not inflate":
        tifffile.imwrite(path, PIXELS, photometric="rgb", tile=(64, 64), compression="zlib")
        _garble(path)
    elif damage == "cut lzw strips":
        tifffile.imwrite(path, PIXELS, photometric="rgb", rowsperstrip=16, compression="lzw")
        _cut(path, keep=0.8)
    return path


DAMAGES = ["cut single strip", "cut tiles", "header taller than data", "bytes that do not inflate", "cut lzw strips"]


@pytest.fixture
def lazily(monkeypatch):
    """Every TIFF read the lazy way (as a whole slide or a file above 50 Mpx is)."""
    import napari_medseg.inference.batch as batch
    import napari_medseg.io.slides as slides
    from napari_medseg.io.lazy import should_open_lazily

    monkeypatch.setattr(batch, "should_open_lazily", lambda path: True)
    monkeypatch.setattr(slides, "should_open_lazily", lambda path: should_open_lazily(path, min_pixels=1))


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_eager_reader_names_a_damaged_tiff(tmp_path, damage):
    path = bad_tiff(tmp_path / "bad.tif", damage)
    with pytest.raises(ImageReadError, match=f"'bad.tif'.*{MESSAGE}"):
        read_image(path)


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_lazy_reader_names_a_damaged_tiff_at_opening_or_at_reading(tmp_path, damage):
    path = bad_tiff(tmp_path / "bad.tif", damage)
    with pytest.raises(ImageReadError, match=f"'bad.tif'.*{MESSAGE}"):
        (level,) = open_tiff_lazy(path)  # the header's promises are checked here
        np.asarray(level)  # bytes that do not decode fail here, as ImageReadError
    if damage == "bytes that do not inflate":
        (level,) = open_tiff_lazy(path)
        with pytest.raises(ImageReadError, match="part of the file is corrupt or truncated and does not decode"):
            np.asarray(level[100:120])  # any band, as the engine reads it


def test_good_tiffs_of_every_layout_read_the_same_lazily_and_eagerly(tmp_path):
    """The readers chosen by storage (memory map, zarr, decoded once) give the file's pixels."""
    gray16 = (PIXELS[..., 0].astype(np.uint16) * 257)
    cases = {
        "single_strip.tif": dict(data=PIXELS, photometric="rgb"),
        "strips.tif": dict(data=PIXELS, photometric="rgb", rowsperstrip=10),
        "tiles.tif": dict(data=PIXELS, photometric="rgb", tile=(64, 64), compression="zlib"),
        "planar.tif": dict(data=np.moveaxis(PIXELS, -1, 0), photometric="rgb", planarconfig="separate"),
        "bigendian16.tif": dict(data=gray16, byteorder=">"),
        "one_zlib_strip.tif": dict(data=PIXELS, photometric="rgb", compression="zlib", rowsperstrip=256),
    }
    for name, kwargs in cases.items():
        tifffile.imwrite(tmp_path / name, **kwargs)
        expected = gray16 if name.startswith("bigendian") else PIXELS
        (level,) = open_tiff_lazy(tmp_path / name)
        assert np.array_equal(np.asarray(level), expected), name
        assert np.array_equal(np.asarray(level[37:91, 5:200]), expected[37:91, 5:200]), name
        assert np.array_equal(read_image(tmp_path / name), expected), name
        assert np.asarray(level).dtype.isnative, name


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("read", ["eager", "lazy"])
def test_predict_skips_a_damaged_tiff_by_name_and_writes_nothing(tmp_path, model, request, damage, read):
    if read == "lazy":
        request.getfixturevalue("lazily")
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = bad_tiff(inputs / "bad.tif", damage)
    before = tree(inputs)
    out = tmp_path / "out"
    proc = medseg("predict", bad, "--model", model, "--out", out, "--no-instances", "--tile", "64",
                  "--overlap", "0", "--device", "cpu")
    err = assert_refused(proc, "skipped", "'bad.tif'")
    assert re.search(MESSAGE, err), err
    assert "wrote no class map" in proc.stdout
    assert not (out / "labels" / "bad.tif").exists() and not no_temp_files(out)
    assert tree(inputs) == before  # the input is untouched


# -- napari ---------------------------------------------------------------------------------
def _open_refused(viewer, path) -> str:
    """napari's File > Open of ``path``: the error it raises, as the user reads it (with its cause)."""
    with pytest.raises(Exception) as info:
        viewer.open(str(path), plugin=PLUGIN)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    return " | ".join(chain)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("read", ["eager", "lazy"])
def test_napari_refuses_a_damaged_tiff_and_adds_no_layer(make_napari_viewer, tmp_path, request, damage, read):
    if read == "lazy":
        request.getfixturevalue("lazily")
    viewer = make_napari_viewer()
    message = _open_refused(viewer, bad_tiff(tmp_path / "bad.tif", damage))
    assert "'bad.tif'" in message and re.search(MESSAGE, message), message
    assert len(viewer.layers) == 0
    tifffile.imwrite(tmp_path / "good.tif", PIXELS, photometric="rgb")  # the viewer carries on
    (layer,) = viewer.open(str(tmp_path / "good.tif"), plugin=PLUGIN)
    assert np.array_equal(np.asarray(layer.data[0] if layer.multiscale else layer.data), PIXELS)


def test_a_pyramid_with_a_damaged_full_resolution_is_refused_by_segment_by_name(make_napari_viewer, tmp_path,
                                                                                  request):
    """The overview draws, so the slide opens; the Segment widget, reading the full resolution,
    stops with the file's name and adds no layer."""
    from napari_medseg._napari.segment_widget import FILE_MODEL
    from napari_medseg._napari.torch_import import import_torch_dynamo

    import_torch_dynamo()  # as the plugin does: torch after a drawn viewer, safely under Mesa
    tiny_checkpoint = request.getfixturevalue("tiny_checkpoint")

    path, full = tmp_path / "slide.ome.tif", np.tile(PIXELS, (8, 8, 1))  # 2048², big enough to open zoomed out
    with tifffile.TiffWriter(path) as tw:
        tw.write(full, subifds=3, tile=(256, 256), compression="zlib", photometric="rgb")
        for step in (2, 4, 8):
            tw.write(full[::step, ::step], subfiletype=1, tile=(256, 256), compression="zlib", photometric="rgb")
    _garble(path)  # level 0's tiles only
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale and np.array_equal(np.asarray(layer.data[3]), full[::8, ::8])
    with pytest.raises(ImageReadError, match="'slide.ome.tif'.*corrupt or truncated"):
        np.asarray(layer.data[0][:64, :64])
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = layer
    segment.model_source.value = FILE_MODEL
    segment.checkpoint.value = tiny_checkpoint
    segment.device.value = "cpu"
    assert segment.run(threaded=False) is None
    assert "'slide.ome.tif'" in segment.status.value and "corrupt or truncated" in segment.status.value
    assert "Traceback" not in segment.status.value and [l.name for l in viewer.layers] == ["slide"]


def test_a_labels_file_holding_nucleus_ids_opens_as_an_instance_map(make_napari_viewer, tmp_path):
    """A '_labels' file with ids beyond any class map's (200000) opens as nuclei: naming and
    colouring every id as a class made napari refuse the layer."""
    labels = np.zeros((64, 64), np.int32)
    labels[5:10, 5:10], labels[20:30, 20:30] = 200000, 3
    tifffile.imwrite(tmp_path / "cells_labels.tif", labels)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "cells_labels.tif"), plugin=PLUGIN)
    assert layer.metadata["medseg"]["kind"] == "instances"
    np.testing.assert_array_equal(layer.data, labels)
