"""Every contribution in napari.yaml, driven the way napari drives it: widgets from
Plugins > napari-medseg (``add_plugin_dock_widget``), samples from File > Open Sample,
files through ``viewer.open(..., plugin=...)`` and layers saved through napari's save path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from napari.layers import Image, Labels

from napari_medseg.io import read_label_map

PLUGIN = "napari-medseg"
MANIFEST = yaml.safe_load((Path(__file__).parents[1] / "napari.yaml").read_text())
WIDGETS = [w["display_name"] for w in MANIFEST["contributions"]["widgets"]]
SAMPLES = {s["key"]: s["display_name"] for s in MANIFEST["contributions"]["sample_data"]}
CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def _unproxied(obj):
    """napari hands plugins its viewer wrapped in a proxy that hides private attributes."""
    return getattr(obj, "__wrapped__", obj)


def test_manifest_lists_the_four_widgets_and_two_samples():
    assert WIDGETS == ["Segment", "Metrics", "Objects", "Train"]
    assert set(SAMPLES) == {"consep", "monuseg"}


@pytest.mark.parametrize("name", WIDGETS)
def test_each_widget_opens_from_the_plugins_menu_with_the_viewer(make_napari_viewer, name):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert dock is not None and type(widget).__name__ == f"{name}Widget"
    assert _unproxied(widget._viewer) is viewer
    # it follows this viewer's layers: layers added afterwards are offered
    image = viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="H&E", rgb=True)
    labels = viewer.add_labels(np.zeros((32, 32), np.uint8), name="painted")
    offered = [_unproxied(layer) for w in widget if hasattr(w, "choices") for layer in w.choices
               if layer is not None and not isinstance(layer, str)]
    assert labels in offered or image in offered, name


def test_samples_open_from_the_file_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    assert [type(l).__name__ for l in viewer.layers] == ["Image", "Labels", "Labels"]
    image, instances, truth = viewer.layers
    assert viewer.layers.selection.active is truth and truth.visible  # not the hidden nuclei: they took a first stroke unseen
    assert image.rgb and image.data.shape == (256, 256, 3)
    assert truth.metadata["medseg"]["classes"] == CONSEP_CLASSES
    assert np.array_equal(truth.data > 0, instances.data > 0)
    viewer.layers.clear()
    viewer.open_sample(PLUGIN, "monuseg")
    assert [l.name for l in viewer.layers] == ["MoNuSeg H&E", "MoNuSeg instances", "MoNuSeg ground truth"]
    assert viewer.layers[0].data.shape == (512, 512, 3) and viewer.layers[1].data.max() > 50


def test_files_open_through_the_plugin_reader(make_napari_viewer, consep, small_consep):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(consep / "images" / "train_1_005.png"), plugin=PLUGIN)
    assert isinstance(image, Image) and image.rgb and image.data.shape == (256, 256, 3)
    viewer.layers.clear()  # its layer would share a name with the folder's first image
    layers = viewer.open(str(small_consep), plugin=PLUGIN)  # 6 images: the first 4, each as its own set
    assert [type(l) for l in layers] == [Image, Labels, Labels] * 4
    assert [l.name for l in layers[-3:]] == ["train_1_005", "train_1_005 instances", "train_1_005 ground truth"]
    assert layers[-1].metadata["medseg"]["classes"] == CONSEP_CLASSES


def test_a_dataset_folder_image_segments_and_scores_against_its_own_ground_truth(make_napari_viewer, small_consep):
    """A dataset folder's image is a plain 2-D image: Segment takes it (a stack it refused) and
    Metrics scores the result against that image's ground truth."""
    viewer = make_napari_viewer()
    viewer.open(str(small_consep), plugin=PLUGIN)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = viewer.layers["train_1_005"]
    segment.device.value = "cpu"
    assert segment.run(threaded=False) is not None, segment.status.value
    assert viewer.layers["train_1_005 segmentation"].data.shape == (256, 256)
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    # chosen by themselves: the result, its own image's ground truth and annotated nuclei
    assert metrics.prediction.value is viewer.layers["train_1_005 segmentation"]
    assert metrics.ground_truth.value is viewer.layers["train_1_005 ground truth"]
    assert metrics.gt_instances.value is viewer.layers["train_1_005 instances"]
    result = metrics.compute()
    assert result is not None and result["overall"]["nucleus_dice"] > 0.6, metrics.summary.value


def _top_shown_image(viewer):
    """The picture one sees: the highest shown Image layer (a dataset folder's images share a place)."""
    return [layer for layer in viewer.layers if isinstance(layer, Image) and layer.visible][-1]


def test_a_hidden_dataset_image_segmented_is_shown_under_its_nuclei(make_napari_viewer, small_consep):
    """A dataset folder opens with its first image shown, the others hidden; segmenting another had
    drawn its nuclei over the first image (outlines on glass and stroma, and that image's truth
    named as 'hidden under the result'). The segmented image is now what lies under its nuclei."""
    viewer = make_napari_viewer()
    viewer.open(str(small_consep), plugin=PLUGIN)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.device.value = "cpu"
    hidden = viewer.layers["train_2_005"]
    assert not hidden.visible and _top_shown_image(viewer) is viewer.layers["train_1_005"]
    segment.image_layer.value = hidden
    assert segment.run(threaded=False) is not None, segment.status.value
    assert hidden.visible and _top_shown_image(viewer) is hidden
    assert "Shown: 'train_2_005', the segmented image (it was hidden)." in segment.status.value
    assert "Hidden under the result: 'train_1_005 ground truth'" in segment.status.value

    # an image shown above the one segmented would cover it: hidden, and named
    lower = viewer.layers["train_2_006"]  # the folder's last image: at the bottom
    segment.image_layer.value = lower
    assert segment.run(threaded=False) is not None, segment.status.value
    assert not hidden.visible and _top_shown_image(viewer) is lower
    assert "'train_2_005'" in segment.status.value.split("Hidden under the result: ")[1]


def test_metrics_with_no_ground_truth_leaves_the_box_empty_and_says_what_to_open(make_napari_viewer, consep):
    """A result alone (an image of the user's, a slide's region): Metrics had chosen the result as
    its own ground truth too, and Compute said 'Prediction and ground truth are the same layer'."""
    viewer = make_napari_viewer()
    viewer.open(str(consep / "images" / "train_1_005.png"), plugin=PLUGIN)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.device.value = "cpu"
    result = segment.run(threaded=False)
    assert result is not None, segment.status.value
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    assert metrics.prediction.value is result and metrics.ground_truth.value is None
    assert metrics.compute() is None
    assert "No ground truth to compare 'train_1_005 segmentation' with: open one" in metrics.summary.value
    assert "same layer" not in metrics.summary.value
    # a ground truth opened afterwards is chosen by itself, and scores
    viewer.open(str(consep / "labels" / "train_1_005.tif"), plugin=PLUGIN)
    assert metrics.ground_truth.value is viewer.layers[-1] and metrics.prediction.value is result
    scores = metrics.compute()
    assert scores is not None and scores["overall"]["nucleus_dice"] > 0.6, metrics.summary.value


def test_a_result_is_drawn_over_the_image_alone_and_says_what_it_hid(make_napari_viewer):
    """Drawn over the sample's ground truth (or an earlier run), the class colours had mixed:
    spindle cyan over the truth's gold read as inflammatory green. What goes under is hidden, named."""
    from test_napari_results import _segment_widget_on_the_sample

    viewer, segment = _segment_widget_on_the_sample(make_napari_viewer)
    truth, truth_nuclei = viewer.layers["CoNSeP ground truth"], viewer.layers["CoNSeP instances"]
    shown_before = [layer.name for layer in (truth, truth_nuclei) if layer.visible]
    assert shown_before  # the sample opens with its truth in view
    first = segment.run(threaded=False)
    assert first is not None and first.visible and segment.last_instances_layer.visible
    assert not truth.visible and not truth_nuclei.visible
    assert "Hidden under the result: " + ", ".join(f"'{name}'" for name in shown_before) in segment.status.value
    first_nuclei = segment.last_instances_layer
    second = segment.run(threaded=False)  # again: the first run's layers go under the second's
    assert second is not first and second.visible and segment.last_instances_layer.visible
    assert not first.visible and not first_nuclei.visible
    assert f"'{first.name}', '{first_nuclei.name}'" in segment.status.value


def test_metrics_docked_first_takes_segments_result_and_the_samples_ground_truth(make_napari_viewer):
    """The sample, Metrics docked, then Segment run: both boxes had stayed on the sample's ground
    truth ('Prediction and ground truth are the same layer') and its nuclei were derived by a
    watershed; now Segment's result, the ground truth and its annotated nuclei are chosen, and a
    box the user set stays."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    truth = viewer.layers["CoNSeP ground truth"]
    assert metrics.ground_truth.value is truth and metrics.gt_instances.value is viewer.layers["CoNSeP instances"]
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.device.value = "cpu"
    assert segment.run(threaded=False) is not None, segment.status.value
    assert metrics.prediction.value is segment.last_layer and metrics.ground_truth.value is truth
    assert metrics.pred_instances.value is segment.last_instances_layer
    result = metrics.compute()
    assert result is not None and result["overall"]["nucleus_dice"] > 0.8, metrics.summary.value
    metrics.gt_instances.value = None  # the user's choice: derived; a new layer leaves it so
    viewer.add_labels(np.zeros(truth.data.shape, np.int32), name="painted")
    assert metrics.gt_instances.value is None and metrics.prediction.value is segment.last_layer


def test_labels_save_through_napari_with_both_writers(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    truth, instances = viewer.layers["CoNSeP ground truth"], viewer.layers["CoNSeP instances"]

    viewer.layers.selection = {truth}
    tif = tmp_path / "truth.tif"
    assert viewer.layers.save(str(tif), selected=True, plugin=PLUGIN) == [str(tif)]
    assert np.array_equal(read_label_map(tif), truth.data)

    viewer.layers.selection = {instances}
    geojson = tmp_path / "nuclei.geojson"
    assert viewer.layers.save(str(geojson), selected=True, plugin=PLUGIN) == [str(geojson)]
    features = json.loads(geojson.read_text())["features"]
    assert sorted(f["properties"]["label"] for f in features) == np.unique(instances.data)[1:].tolist()
    assert {f["properties"]["classification"]["name"] for f in features} <= set(CONSEP_CLASSES[1:])


def test_a_class_map_saved_as_outlines_says_they_are_regions_not_nuclei(make_napari_viewer, tmp_path, monkeypatch):
    """A QuPath user saving the class map had 439 outlines for 112 nuclei, without a word."""
    import napari.utils.notifications as notifications

    said = []
    monkeypatch.setattr(notifications, "show_info", said.append)
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    viewer.layers.selection = {viewer.layers["CoNSeP ground truth"]}
    target = tmp_path / "regions.geojson"
    assert viewer.layers.save(str(target), selected=True, plugin=PLUGIN) == [str(target)]
    regions = len(json.loads(target.read_text())["features"])
    assert said == [f"Saved {regions} outlines of 'CoNSeP ground truth': one per connected region of one class, not "
                    "one per nucleus. For one outline per nucleus, save its nuclei layer ('CoNSeP instances')."]


def test_labels_saved_on_a_scaled_image_reopen_on_it(make_napari_viewer, tmp_path):
    """A label map drawn on an image that records its pixel size (0.25 µm) keeps it when saved
    through napari, and reopens at that scale: on its image, not four times its size."""
    import tifffile

    viewer = make_napari_viewer()
    image_path = tmp_path / "tile.ome.tif"
    tifffile.imwrite(image_path, np.full((64, 80, 3), 200, np.uint8), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    (image,) = viewer.open(str(image_path), plugin=PLUGIN)
    assert tuple(image.scale) == (0.25, 0.25)
    painted = np.zeros((64, 80), np.uint8)
    painted[10:20, 10:30] = 2
    labels = viewer.add_labels(painted, name="tile_labels", scale=image.scale, units=image.units)
    viewer.layers.selection = {labels}
    target = tmp_path / "tile_labels.tif"
    assert viewer.layers.save(str(target), selected=True, plugin=PLUGIN) == [str(target)]
    (reopened,) = viewer.open(str(target), plugin=PLUGIN)
    assert tuple(reopened.scale) == (0.25, 0.25) and np.array_equal(reopened.data, painted)
    assert np.allclose(reopened.extent.world, image.extent.world)


def test_result_layers_saved_as_tiffs_reopen_as_what_they_were(make_napari_viewer, tmp_path):
    """napari's Save proposes the layer's name ('... nuclei.tif', no '_instances'): the nuclei had
    reopened as an Image (over 64 ids), the class map with numbered classes (Metrics then refused
    it), a region's result at (0, 0). The writer records what the layer was; the reader reads it."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = viewer.layers["CoNSeP H&E"]
    segment.device.value = "cpu"
    # drawn in µm, the sample's units (0.25 µm/px): pixels (64, 32) to (192, 160)
    shapes = viewer.add_shapes([np.array([[64, 32], [64, 160], [192, 160], [192, 32]]) * 0.25], shape_type="rectangle")
    segment.target.value, segment.shapes_layer.value = "drawn shape", shapes
    classes = segment.run(threaded=False)
    nuclei = segment.last_instances_layer
    for layer in (classes, nuclei):
        viewer.layers.selection = {layer}
        target = tmp_path / f"{layer.name}.tif"
        assert viewer.layers.save(str(target), selected=True, plugin=PLUGIN) == [str(target)]
    (again_classes,) = viewer.open(str(tmp_path / f"{classes.name}.tif"), plugin=PLUGIN)
    (again_nuclei,) = viewer.open(str(tmp_path / f"{nuclei.name}.tif"), plugin=PLUGIN)
    assert isinstance(again_nuclei, Labels) and again_nuclei.metadata["medseg"]["kind"] == "instances"
    assert np.array_equal(again_nuclei.data, nuclei.data) and len(np.unique(nuclei.data)) > 3
    assert again_classes.metadata["medseg"]["classes"] == CONSEP_CLASSES
    for before, after in ((classes, again_classes), (nuclei, again_nuclei)):
        assert tuple(after.translate) == tuple(before.translate) == (16.0, 8.0)  # (64, 32) px, in µm
        assert after.metadata["medseg"]["origin"] == [64, 32]
    assert np.array_equal(again_nuclei.colormap.map(np.unique(nuclei.data)), nuclei.colormap.map(np.unique(nuclei.data)))


def test_segment_and_metrics_from_the_menu_work_on_the_sample(make_napari_viewer):
    """The widgets as napari makes them (with its viewer proxy) do their work, not just open."""
    from test_napari_results import _segment_widget_on_the_sample

    viewer, segment = _segment_widget_on_the_sample(make_napari_viewer)
    assert segment.run(threaded=False) is not None, segment.status.value
    assert "CoNSeP H&E segmentation" in viewer.layers and "CoNSeP H&E nuclei" in viewer.layers
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value = viewer.layers["CoNSeP H&E segmentation"]
    metrics.ground_truth.value = viewer.layers["CoNSeP ground truth"]
    result = metrics.compute()
    assert result is not None and result["overall"]["nucleus_dice"] > 0.6, metrics.summary.value


# A fresh session, as a user meets it: the viewer (and its OpenGL) first, the plugin's torch
# stack afterwards. Under Mesa's llvmpipe (Xvfb) importing Triton at that point segfaults
# unless torch_import hides it; the guard must not leave Triton hidden for the session.
FRESH_SESSION = textwrap.dedent("""
    import sys
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_medseg._napari.torch_import import system_llvm_loaded

    viewer = napari.Viewer()
    viewer.open_sample("napari-medseg", "consep")
    QApplication.processEvents()
    viewer.screenshot(canvas_only=True)  # the canvas has drawn: its OpenGL is loaded
    print("system LLVM loaded:", system_llvm_loaded(), flush=True)
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.image_layer.value = viewer.layers["CoNSeP H&E"]
    segment.device.value = "cpu"
    assert segment.run(threaded=False) is not None, segment.status.value
    viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    assert sys.modules.get("triton", "absent") is not None, "Triton left hidden for the session"
    viewer.close()
    print("fresh session fine", flush=True)
""")


def test_fresh_session_opens_segment_and_train_without_crashing():
    done = subprocess.run([sys.executable, "-c", FRESH_SESSION], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fresh session fine" in done.stdout, (done.returncode, done.stdout,
                                                                          done.stderr[-3000:])


def test_every_form_fits_its_dock_with_long_layer_names(make_napari_viewer, qtbot):
    """Docked side by side at 1600 x 1000, no widget's form is wider than its dock, even when the
    layer lists hold long names (a combo box grows to its longest choice; the dock does not
    scroll sideways, so a wider form was cut off on the right)."""
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    long = "slide 2024-03-17 patient 0042 region of interest 7 (re-scanned at 40x)"
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name=long, rgb=True)
    viewer.add_labels(np.zeros((64, 64), np.uint8), name=f"{long} segmentation")
    for name in WIDGETS:
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        qtbot.wait(50)
        outer = widget.native
        form = outer.widget() if isinstance(outer, QScrollArea) else outer
        assert form.minimumSizeHint().width() <= outer.width(), name


def test_opening_a_widget_makes_vispys_dash_patterns_off_the_gui_thread():
    """The first Labels layer of a session built vispy's 13 dash patterns (pure Python, 0.2-0.4 s)
    on the GUI thread; opening any widget makes them on a thread of its own."""
    from vispy.visuals.line.dash_atlas import _make_pattern

    from napari_medseg._napari import common

    common.warm_label_visuals()
    common._warming.join(timeout=30)
    assert common._warming.name == "medseg-warm-visuals" and not common._warming.is_alive()
    assert _make_pattern.cache_info().currsize >= 13


def test_after_the_warm_up_a_result_layer_imports_nothing(tmp_path):
    """A result layer's first construction imported pandas, scikit-image's colour module and
    scipy.linalg (~380 modules) in the worker at a run's end, their set-up holding the interpreter
    lock for up to 0.1 s while the GUI took the result in; the warm-up (a widget opening) does it
    first. Run in a fresh interpreter: this one has imported them all long ago."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np
from napari_medseg._napari import common
from napari_medseg._napari.segment_results import labels_layers
from napari_medseg._napari.layers import class_labels_kwargs, instance_labels_kwargs
common.warm_label_visuals()
common._warming.join(timeout=120)
before = set(sys.modules)
classes = ["background", "other", "inflammatory", "epithelial", "spindle"]
nuclei = np.arange(64, dtype=np.int32).reshape(8, 8)
labels_layers(np.zeros((8, 8), np.uint8), class_labels_kwargs("c", classes), nuclei,
               instance_labels_kwargs("n", classes, None, np.arange(64) % 5))
print(sorted(set(sys.modules) - before))
"""
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
