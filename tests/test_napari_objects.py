"""The Objects widget as a user meets it: opened from the Plugins menu, its table readable (one
row per nucleus, named columns), the same nucleus count as Segment, areas in µm² where the image
says its pixel size, Measure off the GUI thread, exports that never replace a file unasked."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari import common
from napari_medseg._napari.layers import class_labels_kwargs, instance_labels_kwargs
from napari_medseg._napari.objects_widget import table_rows
from napari_medseg._napari.sample_data import consep_sample

PLUGIN = "napari-medseg"
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


@pytest.fixture
def objects(make_napari_viewer):
    viewer = make_napari_viewer()
    image, instances, truth = [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in consep_sample()]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    return viewer, widget, image, truth, instances


def test_table_shows_one_row_per_nucleus_with_named_columns(objects):
    viewer, widget, image, truth, instances = objects
    widget.class_layer.value, widget.instance_layer.value, widget.image_layer.value = truth, instances, image
    table = widget.measure()
    shown = widget.table.value
    ids = np.unique(instances.data[instances.data > 0])
    # the sample is in µm (0.25 µm/px): the areas in µm² too
    assert list(shown["columns"][:5]) == ["class", "area_um2", "area", "centroid_y", "centroid_x"]
    assert [int(i) for i in shown["index"]] == list(ids)
    assert len(shown["data"]) == len(ids) and len(shown["data"][0]) == len(shown["columns"])
    row = dict(zip(shown["columns"], shown["data"][0]))
    assert row["area"] == int((instances.data == ids[0]).sum()) and row["class"] in CLASSES[1:]
    assert f"{len(ids)} nuclei" in widget.summary.value
    assert "epithelial" in widget.legend.value
    # the Qt table itself shows the same cells (not 'data' / 'columns' headers)
    qt = widget.table.native
    assert qt.rowCount() == len(ids) and qt.horizontalHeaderItem(0).text() == "class"
    assert table is widget.objects


def test_area_in_square_microns_from_the_image_scale(objects):
    viewer, widget, image, truth, instances = objects
    image.scale = (0.25, 0.25)
    widget.class_layer.value, widget.instance_layer.value, widget.image_layer.value = truth, instances, image
    table = widget.measure()
    np.testing.assert_allclose(table["area_um2"], table["area"] * 0.0625)
    assert "µm²" in widget.summary.value and "area_um2" in widget.table.value["columns"]


def test_segment_nuclei_are_the_default_and_counted_once(make_napari_viewer):
    """Objects picks '<image> nuclei' for '<image> segmentation': one count for one result."""
    viewer = make_napari_viewer()
    truth = consep_sample()[1][0]
    seg = viewer.add_labels((truth > 0).astype(np.uint8), **class_labels_kwargs("x segmentation", CLASSES))
    nuclei = viewer.add_labels(truth, **instance_labels_kwargs("x nuclei"))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    widget.class_layer.value = seg
    assert widget.instance_layer.value is nuclei
    widget.measure()
    assert widget.summary.value.startswith(f"{len(np.unique(truth)) - 1} nuclei")


def test_measure_runs_in_a_worker(objects, qtbot):
    viewer, widget, image, truth, instances = objects
    widget.class_layer.value, widget.instance_layer.value = truth, None
    worker = widget.measure(threaded=True)
    assert not widget.measure_button.enabled
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    qtbot.waitUntil(lambda: widget.objects is not None and not widget.table.filling, timeout=5_000)
    assert viewer.layers[-1].name == "CoNSeP H&E labels instances" or viewer.layers[-1].name.endswith("instances")
    assert widget.measure_button.enabled and len(widget.table.value["data"]) == len(widget.objects["label"])
    shown, measured = widget.table.value, table_rows(widget.objects)
    assert shown["data"] == measured["data"] and list(shown["columns"]) == measured["columns"]
    assert [str(i) for i in shown["index"]] == measured["index"]


def test_fast_table_fills_in_steps_and_ends_as_magicguis_table(qtbot):
    """A long table arrives a slice of rows per event-loop turn and then holds what magicgui's own
    Table holds for the same value (numbers stay numbers)."""
    from magicgui.widgets import Table

    from napari_medseg._napari.fast_table import ROWS_PER_STEP, FastTable

    rows = [[i, round(i / 7, 2), f"class {i % 4}"] for i in range(3 * ROWS_PER_STEP + 5)]
    value = {"data": rows, "index": [str(i + 1) for i in range(len(rows))], "columns": ["area", "ratio", "class"]}
    fast, reference = FastTable(value={"data": [], "index": [], "columns": []}), Table(value=value)
    fast.fill(value)
    assert fast.filling and fast.native.item(len(rows) - 1, 0) is None  # the last rows come later
    qtbot.waitUntil(lambda: not fast.filling, timeout=5_000)
    assert fast.value == reference.value and fast.value["data"][-1][1] == rows[-1][1]
    fast.fill(value)
    fast.value = {"data": rows[:2], "index": ["a", "b"], "columns": ["area", "ratio", "class"]}  # a newer fill wins
    qtbot.wait(50)
    assert not fast.filling and list(fast.value["index"]) == ["a", "b"] and fast.value["data"] == rows[:2]


def test_export_refuses_to_replace_unasked_and_says_where(objects, tmp_path, monkeypatch):
    viewer, widget, image, truth, instances = objects
    widget.class_layer.value, widget.instance_layer.value = truth, instances
    widget.measure()
    target = tmp_path / "objects.csv"
    written = widget.export_csv(target)
    assert written == target and str(target) in widget.summary.value
    asked = []
    monkeypatch.setattr(common, "confirm_replace", lambda path: asked.append(path) or False)
    before = target.stat().st_mtime_ns
    assert widget.export_csv(target) is None and asked == [str(target)]
    assert target.stat().st_mtime_ns == before and "Nothing exported" in widget.summary.value


def test_objects_never_measures_one_class_map_with_anothers_nuclei(make_napari_viewer, tmp_path):
    """Segment's result picks its own nuclei; back on the ground truth, those are dropped (the
    truth had been counted with the model's nuclei, 'background' among its classes), and the
    GeoJSON export takes the measured map's colours, whatever the box shows since."""
    import json

    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "consep")
    _, seg = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    seg.device.value = "cpu"
    seg.run(threaded=False)
    _, obj = viewer.window.add_plugin_dock_widget("napari-medseg", "Objects")
    obj.class_layer.value = viewer.layers["CoNSeP H&E segmentation"]
    assert obj.instance_layer.value is viewer.layers["CoNSeP H&E nuclei"]
    obj.measure(threaded=False)
    predicted = obj.summary.value
    assert obj.image_layer.value is viewer.layers["CoNSeP H&E"]  # its intensities: the image it was made of
    obj.class_layer.value = viewer.layers["CoNSeP ground truth"]
    assert obj.instance_layer.value is viewer.layers["CoNSeP instances"]  # the annotated nuclei, not the model's
    obj.measure(threaded=False)
    assert obj.summary.value != predicted and "background" not in obj.summary.value
    viewer.layers.remove("CoNSeP H&E segmentation")  # the box moves on; the export is of what was measured
    target = tmp_path / "truth.geojson"
    assert obj.export_geojson(target) == target
    names = {f["properties"]["classification"]["name"] for f in json.loads(target.read_text())["features"]}
    assert names <= {"other", "inflammatory", "epithelial", "spindle"}


def test_measuring_again_with_more_or_fewer_columns(objects, qtbot):
    """Measured without an image, then with it (more columns: the mean intensities), then with a
    gray image and without one again: each table has its own columns, every header named."""
    viewer, widget, image, truth, instances = objects
    gray = viewer.add_image(image.data[..., 0], name="gray", scale=image.scale, units=image.units)  # on the image
    widget.class_layer.value, widget.instance_layer.value = truth, instances
    seen = []
    for chosen in (None, image, gray, None):
        widget.image_layer.value = chosen
        widget.measure_button.native.click()
        qtbot.waitUntil(lambda: widget.measure_button.enabled and not widget.table.filling, timeout=60_000)
        assert not widget.summary.value.startswith(("Measuring", "Error")), widget.summary.value
        shown, measured = widget.table.value, table_rows(widget.objects)
        assert list(shown["columns"]) == measured["columns"] and shown["data"] == measured["data"]
        qt = widget.table.native
        assert qt.columnCount() == len(measured["columns"])
        assert [qt.horizontalHeaderItem(i).text() for i in range(qt.columnCount())] == measured["columns"]
        seen.append(len(measured["columns"]))
    assert seen[0] < seen[2] < seen[1] and seen[3] == seen[0]


def test_objects_docked_before_segment_measures_segments_nuclei(make_napari_viewer, qtbot):
    """Objects open before a run: Segment adds its class map, then its nuclei a turn later; the
    class map (chosen as it came) is measured with those nuclei, the count Segment gave, and no
    nuclei of Objects' own are added."""
    viewer = make_napari_viewer()
    image = consep_sample()[0]
    viewer.add_image(image[0], **image[1])
    _, obj = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    seg.run_button.native.click()
    qtbot.waitUntil(lambda: seg.run_button.enabled and seg.status.value.startswith("Done"), timeout=120_000)
    nuclei = viewer.layers["CoNSeP H&E nuclei"]
    assert obj.class_layer.value is viewer.layers["CoNSeP H&E segmentation"]
    assert obj.instance_layer.value is nuclei
    before = len(viewer.layers)
    obj.measure_button.native.click()
    qtbot.waitUntil(lambda: obj.measure_button.enabled and obj.objects is not None, timeout=60_000)
    count = len(np.unique(nuclei.data)) - 1
    assert seg.status.value.startswith(f"Done: {count} nuclei")
    assert obj.summary.value.startswith(f"{count} nuclei") and len(viewer.layers) == before


def test_a_regions_result_is_measured_with_its_whole_image(make_napari_viewer):
    """A drawn rectangle's result, measured with the image it was drawn on: the intensities are
    those of the rectangle's pixels of the image (it had been refused: 'choose the image of the
    same 2-D image'); an image placed elsewhere on the canvas is still refused."""
    from napari_medseg.nuclei.measure import object_table

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    image = viewer.layers["CoNSeP H&E"]
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    corners = np.array([[40, 60], [40, 200], [180, 200], [180, 60]]) * image.scale  # the sample's µm
    shapes = viewer.add_shapes([corners], shape_type="rectangle")
    seg.target.value, seg.shapes_layer.value = "drawn shape", shapes
    region = seg.run(threaded=False)
    assert region.data.shape == (140, 140) and region.metadata["medseg"]["origin"] == [40, 60]
    _, obj = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    obj.class_layer.value, obj.image_layer.value = region, image
    assert obj.instance_layer.value is seg.last_instances_layer
    table = obj.measure()
    assert table is not None, obj.summary.value
    by_hand = object_table(seg.last_instances_layer.data, region.data, CLASSES, image.data[40:180, 60:200])
    np.testing.assert_allclose(table["mean_intensity_r"], by_hand["mean_intensity_r"])
    np.testing.assert_allclose(table["centroid_y"], by_hand["centroid_y"] + 40)
    assert "mean_intensity_b" in obj.table.value["columns"]
    image.translate = (5, 5)  # no longer under the result
    assert obj.measure() is None and "same 2-D image" in obj.summary.value


def test_measuring_derived_nuclei_again_updates_their_layer(objects, qtbot):
    """'derive from class map': each Measure updates the nuclei layer it made for that class map
    (in place, its name kept) instead of adding '... instances [1]', '... [2]'; another class map
    gets a layer of its own."""
    viewer, widget, image, truth, instances = objects
    widget.class_layer.value, widget.instance_layer.value = truth, None

    def measure():
        widget.measure_button.native.click()
        qtbot.waitUntil(lambda: widget.measure_button.enabled and not widget.table.filling, timeout=60_000)
        assert widget.summary.value.split(" ")[1] == "nuclei:", widget.summary.value

    measure()
    made = viewer.layers[-1]
    assert made.name == "CoNSeP ground truth instances" and made.data.max() > 0
    made.name = "my nuclei"
    before = len(viewer.layers)
    truth.data_setitem(np.nonzero(truth.data[:128] >= 0), 0)  # the top half erased
    measure()
    measure()
    assert len(viewer.layers) == before and viewer.layers[-1] is made and made.name == "my nuclei"
    assert not made.data[:120].any() and made.data[136:].any() and widget.instance_layer.value is None
    np.testing.assert_array_equal(made.data, widget._instances)
    other = viewer.add_labels((truth.data > 0).astype(np.uint8), **class_labels_kwargs("mask", ["background", "n"]))
    widget.class_layer.value = other
    measure()
    assert len(viewer.layers) == before + 2 and viewer.layers[-1].name == "mask instances"


def test_a_files_labels_are_measured_with_its_instances_and_image(make_napari_viewer, tmp_path):
    """A dataset's image, labels and instances dragged in: Objects picks '<stem> instances' and the
    image '<stem>' for '<stem> labels' (it had derived nuclei by a watershed and measured no
    intensities); a choice the user makes stays."""
    from napari_medseg.io.images import write_label_map
    from skimage.io import imsave

    image, instances, truth = (data for data, _kwargs, _kind in consep_sample())
    for folder in ("images", "labels", "instances"):
        (tmp_path / folder).mkdir()
    imsave(tmp_path / "images" / "x.png", image, check_contrast=False)
    write_label_map(tmp_path / "labels" / "x.tif", truth)
    write_label_map(tmp_path / "instances" / "x.tif", instances)
    viewer = make_napari_viewer()
    for folder, ending in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
        viewer.open(str(tmp_path / folder / f"x{ending}"), plugin=PLUGIN)
    viewer.add_image(image[:100], name="another image")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    widget.class_layer.value = viewer.layers["x labels"]
    assert widget.instance_layer.value is viewer.layers["x instances"]
    assert widget.image_layer.value is viewer.layers["x"]
    table = widget.measure()
    assert len(table["label"]) == len(np.unique(instances)) - 1
    assert "mean_intensity_r" in widget.table.value["columns"]
    widget.image_layer.value = None  # the user's choice: no intensities
    viewer.add_image(image, name="x copy")

    assert widget.image_layer.value is None


def _consep_fold(folder_path, consep) -> list:
    """A PanNuke fold (images.npy, masks.npy, types.npy) of three CoNSeP patches written to
    ``folder_path``; the patches, in order."""
    from napari_medseg.io.dataset import open_dataset

    folder = open_dataset(consep)
    samples = [folder.load(s) for s in folder.stems[:3]]
    masks = np.zeros((3, 256, 256, 6))
    for i, s in enumerate(samples):
        for c in range(1, 5):
            masks[i, ..., c - 1] = np.where(s.labels == c, s.instances, 0)
        masks[i, ..., 5] = s.labels == 0
    np.save(folder_path / "images.npy", np.stack([s.image for s in samples]).astype(np.float64))
    np.save(folder_path / "masks.npy", masks)
    np.save(folder_path / "types.npy", np.array(["Colon"] * 3))
    return samples


def test_segments_result_on_a_pannuke_patch_is_measured_with_its_plane(make_napari_viewer, tmp_path, consep):
    """A fold opened, Segment run on the patch shown, Objects on its result: the result (one plane
    of the stack) had been refused against its own nuclei ('(256, 256)' vs '(1, 256, 256)'); now
    measured with them and with that patch of the image, in µm² (PanNuke is 0.25 µm/px)."""
    samples = _consep_fold(tmp_path, consep)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path), plugin=PLUGIN)
    viewer.dims.set_current_step(0, 1)
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    seg.run(threaded=False)
    nuclei = seg.last_instances_layer
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    assert widget.instance_layer.value is nuclei and widget.image_layer.value is viewer.layers[0]
    table = widget.measure(threaded=False)
    assert table is not None, widget.summary.value
    assert len(table["label"]) == len(np.unique(nuclei.data)) - 1 > 0
    np.testing.assert_allclose(table["area_um2"], table["area"] * 0.0625)
    # the intensities are patch 1's, not the stack's first
    one = table["label"][0]
    inside = np.asarray(nuclei.data).reshape(256, 256) == one
    assert table["mean_intensity_r"][0] == pytest.approx(samples[1].image[..., 0][inside].mean(), rel=1e-4)



def test_a_pannuke_folds_ground_truth_is_measured_at_the_patch_shown(make_napari_viewer, tmp_path, consep):
    """The fold's ground truth (a stack of patches) had been refused ('segment the image shown');
    now the patch the viewer shows is measured with its own annotated nuclei and image, and a
    row of the table brings the view back to that patch."""
    samples = _consep_fold(tmp_path, consep)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path), plugin=PLUGIN)
    truth = next(layer for layer in viewer.layers if layer.name.endswith("ground truth"))
    viewer.dims.set_current_step(0, 2)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    widget.class_layer.value = truth
    nuclei = widget.instance_layer.value
    assert nuclei is not None and nuclei.name.endswith("instances") and widget.image_layer.value is viewer.layers[0]
    table = widget.measure(threaded=False)
    assert table is not None, widget.summary.value
    annotated = np.asarray(nuclei.data[2])
    assert sorted(table["label"]) == sorted(np.unique(annotated)[1:])
    assert len(table["label"]) == len(np.unique(samples[2].instances)) - 1
    one = int(table["label"][0])
    inside = annotated == one
    assert table["mean_intensity_r"][0] == pytest.approx(samples[2].image[..., 0][inside].mean(), rel=1e-4)
    assert "the image shown (slider at 2 of 0-2) was measured" in widget.summary.value
    # derived by the watershed instead: a layer on that patch only
    widget.instance_layer.value = None
    table = widget.measure(threaded=False)
    assert table is not None, widget.summary.value
    derived = viewer.layers[-1]
    assert derived.name == f"{truth.name} instances" and derived.data.shape == (1, 256, 256)
    assert derived.data_to_world((0, 0, 0))[0] == pytest.approx(truth.data_to_world((2, 0, 0))[0])
    # a row chosen while another patch is shown: the view goes back to the patch measured
    viewer.dims.set_current_step(0, 0)
    widget.table.native.selectRow(0)
    assert viewer.dims.current_step[0] == 2


def test_a_folder_as_the_export_path_opens_the_save_dialog_there_and_an_error_is_said_once(objects, tmp_path,
                                                                                           monkeypatch):
    """A cleared path box reads as the folder napari started in: it had been offered for
    'replacing' ('/tmp/walk3 exists. Replace it?'), then 'Cannot write X: Cannot write X: Is a
    directory'. A folder is no file to write: the save dialog opens in it."""
    from qtpy.QtWidgets import QFileDialog

    viewer, widget, image, truth, instances = objects
    widget.class_layer.value, widget.instance_layer.value = truth, instances
    widget.measure()
    asked, opened = [], []
    monkeypatch.setattr(common, "confirm_replace", lambda path: asked.append(path) or True)
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda parent, title, where, kinds: opened.append(where) or ("", ""))
    assert widget.export_csv(tmp_path) is None and "Nothing exported" in widget.summary.value
    assert opened == [str(tmp_path)] and asked == []
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda parent, title, where, kinds: (str(tmp_path / "chosen.csv"), ""))
    assert widget.export_csv(tmp_path) == tmp_path / "chosen.csv" and (tmp_path / "chosen.csv").is_file()
    blocker = tmp_path / "a file"
    blocker.write_text("mine")
    assert widget.export_csv(blocker / "objects.csv") is None
    assert widget.summary.value.count("Cannot write") == 1, widget.summary.value
    assert blocker.read_text() == "mine"


def test_objects_opened_before_segment_measures_segments_result_after_the_run(make_napari_viewer):
    """Objects docked on the sample (it chose the ground truth), then Segment run: Measure had
    counted the ground truth's 104 nuclei again while Segment had just found its own; a class map
    the user chose stays."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "consep")
    _, obj = viewer.window.add_plugin_dock_widget("napari-medseg", "Objects")
    assert obj.class_layer.value is viewer.layers["CoNSeP ground truth"]
    _, seg = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    seg.device.value = "cpu"
    result = seg.run(threaded=False)
    assert obj.class_layer.value is result and obj.instance_layer.value is seg.last_instances_layer
    table = obj.measure(threaded=False)
    assert len(table["label"]) == len(np.unique(seg.last_instances_layer.data)) - 1
    obj.class_layer.value = viewer.layers["CoNSeP ground truth"]  # the user's choice
    seg.run(threaded=False)
    assert obj.class_layer.value is viewer.layers["CoNSeP ground truth"]
