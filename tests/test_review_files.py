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


def _saved_and_reopened(viewer, layer, path):
    """``layer`` saved through napari's own path with the plugin's writer, then opened again."""
    viewer.layers.selection = {layer}
    assert viewer.layers.save(str(path), selected=True, plugin="napari-medseg") == [str(path)]
    return viewer.open(str(path), plugin="napari-medseg")[0]


def test_a_labels_layer_painted_by_hand_reopens_as_labels(make_napari_viewer, tmp_path, consep):
    """A Labels layer the plugin did not make (91 ids, in µm) saved as a label TIFF had reopened
    as an Image layer (a map of more than 64 values taken for a picture). It reopens as Labels,
    the same ids, scale and units, in 32 bits (in 8, napari refuses to paint id 256)."""
    from napari.layers import Labels

    from napari_medseg.io.images import read_label_map

    nuclei = read_label_map(consep / "instances" / "train_10_006.tif").astype(np.int32)
    assert 64 < len(np.unique(nuclei)) < 256  # stored in 8 bits
    viewer = make_napari_viewer()
    layer = viewer.add_labels(nuclei, name="my nuclei", scale=(0.25, 0.25), units=("micrometer", "micrometer"))
    reopened = _saved_and_reopened(viewer, layer, tmp_path / "my nuclei.tif")
    assert isinstance(reopened, Labels) and np.array_equal(reopened.data, nuclei)
    assert tuple(reopened.scale) == (0.25, 0.25) and [str(u) for u in reopened.units] == ["micrometer"] * 2
    assert reopened.data.dtype == np.int32
    reopened.selected_label = 256  # a new nucleus past the stored 8 bits
    reopened.paint((5, 5), 256, refresh=False)
    assert reopened.data[5, 5] == 256


def test_a_segment_nucleus_layer_reopens_paintable(make_napari_viewer, tmp_path, consep):
    """The sample's nucleus layer saved and reopened keeps kind, classes, colours and its ids, in
    a dtype a new nucleus past 255 fits in."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "consep")
    layer = viewer.layers["CoNSeP instances"]
    reopened = _saved_and_reopened(viewer, layer, tmp_path / "nuclei.tif")
    info, before = reopened.metadata["medseg"], layer.metadata["medseg"]
    assert info["kind"] == "instances" and info["classes"] == before["classes"]
    assert info["colors"] == before["colors"]
    assert np.array_equal(info["instance_classes"], before["instance_classes"])
    assert np.array_equal(reopened.data, layer.data) and reopened.data.dtype.itemsize >= 2
    reopened.selected_label = 300


@pytest.mark.parametrize("name", ["n" * 230 + ".tif", "\u00e4" * 120 + ".geojson"])
def test_a_long_file_name_saves(make_napari_viewer, tmp_path, consep, name):
    """A file name of 230 characters (or 240 bytes of umlauts) is one the disk takes; the save
    was refused as "File name too long", its hidden temp name being ~60 bytes longer."""
    from napari_medseg.io.images import read_label_map

    viewer = make_napari_viewer()
    layer = viewer.add_labels(read_label_map(consep / "labels" / "train_1_005.tif"), name="classes")
    viewer.layers.selection = {layer}
    assert viewer.layers.save(str(tmp_path / name), selected=True, plugin="napari-medseg") == [str(tmp_path / name)]
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_cut_temp_name_of_a_killed_run_is_still_removed(tmp_path, monkeypatch):
    """A long target's temp name, cut to fit, is still known as a temp file of a process that is gone."""
    import os

    from napari_medseg.io.outputs import NAME_MAX, remove_stale_temps, temp_path

    with monkeypatch.context() as patched:
        patched.setattr(os, "getpid", lambda: 999_999_999)  # a process that no longer runs
        dead = temp_path(tmp_path / ("\u00e4" * 127 + ".tif"))
    assert len(dead.name.encode()) <= NAME_MAX
    dead.write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == [dead] and not dead.exists()


def test_a_dataset_folder_of_calibrated_tiffs_opens_in_micrometres(make_napari_viewer, small_consep):
    """A dataset folder whose images are OME-TIFFs of 0.5 µm/px opened at scale 1 (the image
    opened alone: 0.5 µm), so Segment took a 20x image for the model's 40x; now its image, ground
    truth and instances are in µm, as the file says, and Segment reads the size."""
    import imageio.v3 as iio

    from napari_medseg._napari.layers import pixel_size_um

    for png in sorted((small_consep / "images").glob("*.png")):
        tifffile.imwrite(png.with_suffix(".ome.tif"), iio.imread(png), photometric="rgb",
                         metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        png.unlink()
    viewer = make_napari_viewer()
    layers = viewer.open(str(small_consep), plugin="napari-medseg")
    assert [layer.name for layer in layers[-3:]] == ["train_1_005", "train_1_005 instances", "train_1_005 ground truth"]
    for layer in layers:
        assert tuple(layer.scale) == (0.5, 0.5) and [str(u) for u in layer.units] == ["micrometer"] * 2
    assert pixel_size_um(layers[0]) == 0.5


def test_a_pannuke_fold_opens_without_copying_it(tmp_path, consep):
    """Opening a fold in napari had dask hash every image's map task by pickling the fold's
    memory-mapped arrays whole, once per task: a 40-image fold took 98 s to open and a real
    fold (~2600 images, 12 GB) never did. Its layers are made in a moment, and their maps are
    the fold's."""
    import time

    from napari_medseg._napari.reader import get_reader
    from napari_medseg.io.images import read_label_map
    from napari_medseg.io.pannuke import read_pannuke_fold

    stems = sorted(p.stem for p in (consep / "images").glob("train_1_*.png"))[:16]
    images = np.stack([read_image(consep / "images" / f"{s}.png") for s in stems]).astype(np.float64)
    masks = np.zeros((len(stems), 256, 256, 6))  # as PanNuke stores them: float64, a channel per class
    for i, stem in enumerate(stems):
        labels, nuclei = (read_label_map(consep / sub / f"{stem}.tif") for sub in ("labels", "instances"))
        for c in range(1, 5):
            masks[i, ..., c - 1] = nuclei * (labels == c)
        masks[i, ..., 5] = nuclei == 0
    fold = tmp_path / "fold3"
    fold.mkdir()
    np.save(fold / "images.npy", np.concatenate([images] * 2))
    np.save(fold / "masks.npy", np.concatenate([masks] * 2))
    np.save(fold / "types.npy", np.array(["Colon"] * 2 * len(stems)))
    start = time.perf_counter()
    layers = get_reader(str(fold))(str(fold))
    assert time.perf_counter() - start < 2.0  # 0.1 s here; ~10 s before
    (image, _, _), (instances, _, _), (classes, _, _) = layers
    assert image.shape == (32, 256, 256, 3) and classes.shape == instances.shape == (32, 256, 256)
    opened = read_pannuke_fold(fold)
    for i in (0, 17, 31):
        expected_classes, expected_instances = opened.class_and_instance_maps(i)
        assert np.array_equal(np.asarray(classes[i]), expected_classes)
        assert np.array_equal(np.asarray(instances[i]), expected_instances)


def test_saving_a_stack_is_refused_before_it_is_computed(tmp_path):
    """A lazy stack of maps (a PanNuke fold's ground truth) was computed whole, every map of the
    fold, only to be refused as not 2-D; the refusal now comes from its shape alone."""
    import dask
    import dask.array as da

    from napari_medseg._napari.writers import write_labels_geojson, write_labels_tiff
    from napari_medseg.io.outputs import OutputWriteError

    never = da.from_delayed(dask.delayed(lambda: 1 // 0)(), (2, 8, 8), np.uint8)  # computing it fails
    for write, name in ((write_labels_tiff, "stack.tif"), (write_labels_geojson, "stack.geojson")):
        with pytest.raises(OutputWriteError, match=r"stack of 2 maps \(2, 8, 8\); one file holds one image"):
            write(str(tmp_path / name), never, {"name": "PanNuke ground truth"})
    assert not list(tmp_path.iterdir())


def test_a_large_label_tiff_this_plugin_wrote_reopens_as_labels(make_napari_viewer, tmp_path, consep):
    """A label map over 50 Mpx (opened lazily, as a slide) written with its record under a name
    that says nothing ('result.tif') had reopened as an Image; it reopens as the class map it
    was: Labels, its classes and colours, its pixel size."""
    from napari.layers import Labels

    from napari_medseg._napari.sample_data import CONSEP_CLASSES
    from napari_medseg.io.images import label_record, read_label_map, write_label_map
    from napari_medseg.io.lazy import LAZY_MIN_PIXELS

    classes = np.tile(read_label_map(consep / "labels" / "train_1_005.tif"), (32, 28))
    assert classes.size > LAZY_MIN_PIXELS
    colors = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    write_label_map(tmp_path / "result.tif", classes, 0.25, label_record("classes", CONSEP_CLASSES, colors))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "result.tif"), plugin="napari-medseg")
    assert isinstance(layer, Labels) and tuple(layer.scale) == (0.25, 0.25)
    info = layer.metadata["medseg"]
    assert info["kind"] == "classes" and info["classes"] == CONSEP_CLASSES and info["colors"] == colors
    assert np.array_equal(np.asarray(layer.data[0][:256, :256]), classes[:256, :256])


@pytest.mark.parametrize("scale", [257, 256])  # ImageJ and tifffile scale 8-bit colours by 257, Pillow by 256
def test_an_indexed_colour_tiff_reads_as_its_colours(tmp_path, real_512, scale):
    """An H&E image saved as indexed colour (ImageJ's "8-bit Color", Pillow's 'P' mode) had read as
    a gray image of its palette indices, eagerly and lazily; it reads as its colours, as the PNG
    does. A display LUT over intensities (a fluorescence image's green LUT) keeps the intensities,
    and a label map keeps its indices."""
    from PIL import Image

    from napari_medseg.io.images import read_label_map
    from napari_medseg.io.lazy import open_tiff_lazy

    indexed = Image.fromarray(real_512).quantize(colors=200)
    indices = np.asarray(indexed)
    colours = np.asarray(indexed.getpalette()[:600], np.uint16).reshape(200, 3)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :200] = colours.T * scale
    tifffile.imwrite(tmp_path / "indexed.tif", indices, photometric="palette", colormap=colormap)
    seen = colours[indices].astype(np.uint8)
    assert np.abs(seen.astype(int) - real_512).mean() < 6  # the quantised H&E, not its indices
    assert np.array_equal(read_image(tmp_path / "indexed.tif"), seen)
    assert np.array_equal(np.asarray(open_tiff_lazy(tmp_path / "indexed.tif")[0]), seen)
    assert np.array_equal(read_label_map(tmp_path / "indexed.tif"), indices)
    gray = real_512[..., 1]
    green = np.zeros((3, 256), np.uint16)
    green[1] = np.arange(256) * 257
    tifffile.imwrite(tmp_path / "dapi.tif", gray, photometric="palette", colormap=green)
    assert np.array_equal(read_image(tmp_path / "dapi.tif"), gray)
