"""A large-image walkthrough's findings, as a user meets them through the plugin's reader and the
Segment widget: what 'whole slide' says of a flat TIFF the reader opened in memory, and the
names `medseg predict`'s results reopen under beside their image."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hostile import medseg
from napari_medseg.io import read_image

PLUGIN = "napari-medseg"


def test_whole_slide_on_a_flat_tiff_says_it_was_read_into_memory(make_napari_viewer, tmp_path, consep,
                                                                   tiny_checkpoint):
    """It had told the user to open the file with the napari-medseg reader, which they had done."""
    from napari_medseg._napari.segment_widget import FILE_MODEL, WHOLE_SLIDE

    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, read_image(consep / "images" / "train_2_000.png"))
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = layer
    segment.model_source.value, segment.checkpoint.value = FILE_MODEL, tiny_checkpoint
    segment.target.value = WHOLE_SLIDE
    assert segment.run(threaded=False) is None
    said = segment.status.value
    assert "'flat' is an image read into memory, not a slide" in said and "from 50 Mpx" in said
    assert "open it with the napari-medseg reader" not in said
    assert len(viewer.layers) == 1  # nothing half-made


def test_predict_results_reopen_named_for_what_they_are(make_napari_viewer, tmp_path, consep, tiny_checkpoint):
    """The class map and nuclei `medseg predict` wrote, dragged in beside their image: named
    'flat', 'flat [1]', 'flat [2]' (which is which?) where the README promises
    '<stem> labels' and '<stem> instances'."""
    tifffile.imwrite(tmp_path / "flat.tif", read_image(consep / "images" / "train_2_000.png")[:96, :96])
    proc = medseg("predict", tmp_path / "flat.tif", "--model", tiny_checkpoint, "--out", tmp_path / "out",
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    viewer = make_napari_viewer()
    for path in (tmp_path / "flat.tif", tmp_path / "out" / "labels" / "flat.tif",
                 tmp_path / "out" / "instances" / "flat.tif"):
        viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in viewer.layers] == ["flat", "flat labels", "flat instances"]
    classes, nuclei = viewer.layers["flat labels"], viewer.layers["flat instances"]
    assert classes.metadata["medseg"]["classes"][0] == "background"
    assert int(np.asarray(nuclei.data).max()) == len(np.unique(nuclei.data)) - 1  # ids as written


def test_nuclei_saved_by_napari_own_labels_writer_reopen_as_labels(make_napari_viewer, tmp_path, monuseg):
    """*File > Save Selected Layers* offers napari's own labels TIFF first: a nuclei layer of
    hundreds of ids saved so had reopened through the plugin as a gray image."""
    from napari_medseg.io import read_label_map

    nuclei = read_label_map(sorted((monuseg / "instances").glob("*.tif"))[0]).astype(np.int32)
    assert nuclei.max() > 64  # more ids than a class map holds
    viewer = make_napari_viewer()
    viewer.add_labels(nuclei, name="nuclei")
    [written] = viewer.layers.save(str(tmp_path / "nuclei.tif"), selected=False, plugin="napari")
    again = make_napari_viewer()
    [layer] = again.open(written, plugin=PLUGIN)
    assert layer._type_string == "labels"
    assert np.array_equal(np.asarray(layer.data), nuclei)


def test_the_status_says_when_the_tiles_are_done_and_the_nuclei_are_being_cut(make_napari_viewer, consep,
                                                                              tiny_checkpoint):
    """On a 36 Mpx image the watershed's whole-image steps took half the run at 99 % under
    'Segmenting ...', as if hung, and a Cancel there seemed not to work. The status names the
    phase when the tiles are done."""
    from napari_medseg._napari.segment_widget import FILE_MODEL

    viewer = make_napari_viewer()
    layer = viewer.add_image(read_image(consep / "images" / "train_2_000.png"), name="patch")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = layer
    segment.model_source.value, segment.checkpoint.value = FILE_MODEL, tiny_checkpoint
    segment.device.value = "cpu"
    said = []
    shown = segment._on_progress

    def watched(step):
        shown(step)
        said.append((step, segment.status.value, segment._cutting_nuclei()))

    segment._on_progress = watched
    assert segment.run(threaded=False) is not None
    tiles_done = [i for i, (_, status, _) in enumerate(said) if status.startswith("Cutting the nuclei of 'patch'")]
    assert tiles_done, sorted({s[0] for s in said})
    assert all(cutting for _, _, cutting in said[tiles_done[0]:])  # Cancel then says it waits for the step
    assert not any(cutting for _, _, cutting in said[:tiles_done[0]])
    assert segment.status.value.startswith("Done:")


def test_a_result_is_never_saved_over_the_image_it_was_made_from(make_napari_viewer, tmp_path, consep):
    """The plugin's label TIFF writer had replaced the open image's file by its nuclei (only Qt's
    'replace?' prompt stood in the way). A layer saved back to its own file is still written."""
    import hashlib

    from napari_medseg.io import read_label_map

    image_path = tmp_path / "src.tif"
    tifffile.imwrite(image_path, read_image(consep / "images" / "train_2_000.png"))
    before = hashlib.md5(image_path.read_bytes()).hexdigest()
    viewer = make_napari_viewer()
    viewer.open(image_path, plugin=PLUGIN)
    nuclei = viewer.add_labels(read_label_map(consep / "instances" / "train_2_000.tif").astype(np.int32),
                               name="src nuclei")
    viewer.layers.selection = {nuclei}
    with pytest.raises(Exception, match="is the file layer 'src' was opened from; it is not overwritten"):
        viewer.layers.save(str(image_path), selected=True, plugin=PLUGIN)
    assert hashlib.md5(image_path.read_bytes()).hexdigest() == before
    # a label TIFF opened, corrected and saved back to itself
    [written] = viewer.layers.save(str(tmp_path / "nuclei.tif"), selected=True, plugin=PLUGIN)
    [reopened] = viewer.open(written, plugin=PLUGIN)
    reopened.data[0, 0] = 1
    viewer.layers.selection = {reopened}
    assert viewer.layers.save(written, selected=True, plugin=PLUGIN) == [written]


def test_a_bigtiff_named_btf_opens_as_its_tif_twin_does(make_napari_viewer, tmp_path, consep, tiny_checkpoint):
    """`.btf` (also `.tf8`, `.tf2`: Bio-Formats' and QuPath's BigTIFF names) had been refused by the
    plugin's reader and by medseg predict; the same file named `.tif` opened at its µm scale."""
    image = read_image(consep / "images" / "train_2_000.png")
    path = tmp_path / "big.btf"
    tifffile.imwrite(path, image, bigtiff=True, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert np.array_equal(read_image(path), image)
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert np.array_equal(np.asarray(layer.data), image) and tuple(layer.scale) == pytest.approx((0.25, 0.25))
    proc = medseg("predict", path, "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "labels" / "big.tif").is_file()
