"""Reading results at a glance, as a user meets them through Plugins > napari-medseg: Segment on
the MoNuSeg sample with the shipped model (nuclei outlined, legend, one count, layers placed on
the image), re-thresholded without the network, scored by Metrics against nucleus-only ground
truth with the classes merged, and a layout at 1600x1000 that leaves the image most of the window."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from napari_medseg.inference.rethreshold import Thresholds

PLUGIN = "napari-medseg"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screens")


def _segmented(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "monuseg")
    image = viewer.layers[0]
    image.scale, image.translate = (0.5, 0.5), (10.0, 20.0)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_layer.value = image
    seg = segment.run(threaded=False)
    return viewer, segment, image, seg


def test_segment_result_reads_at_a_glance_and_rethresholds(make_napari_viewer):
    viewer, segment, image, seg = _segmented(make_napari_viewer)
    nuclei = segment.last_instances_layer
    for layer in (seg, nuclei):  # placed on the image
        assert tuple(layer.scale) == (0.5, 0.5) and tuple(layer.translate) == (10.0, 20.0)
    assert nuclei.contour > 0  # outlines over the class colours
    _assert_outlines_take_their_class_colour(viewer, seg, nuclei)
    count = len(np.unique(nuclei.data)) - 1
    assert segment.status.value.startswith(f"Done: {count} nuclei")
    assert all(name in segment.legend.value for name in ("inflammatory", "epithelial"))
    # napari shows the class name of the pixel under the cursor (the layer's features)
    y, x = np.argwhere(seg.data == 3)[0]
    status = seg.get_status(seg.data_to_world((y, x)), world=True)
    assert "epithelial" in str(status), status
    # re-thresholding: the same settings give the same result; a higher threshold fewer pixels
    kept_labels, kept_nuclei = segment.kept.result(segment.thresholds())
    np.testing.assert_array_equal(kept_labels, seg.data)
    np.testing.assert_array_equal(kept_nuclei, nuclei.data)
    before = int((seg.data > 0).sum())
    segment.threshold.value = 0.9
    labels, instances = segment.rethreshold(threaded=False)
    assert seg.data is labels and int((labels > 0).sum()) < before
    assert segment.status.value.startswith(f"Done: {len(np.unique(instances)) - 1} nuclei")
    assert "nucleus threshold 0.90" in segment.status.value
    # the widget's new nuclei, in place, take their own classes' colours, not those of the old ids
    assert nuclei.data is instances
    _assert_outlines_take_their_class_colour(viewer, seg, nuclei)
    # the nuclei deleted: the class map alone follows, and the status counts no nuclei it does not show
    viewer.layers.remove(nuclei)
    segment.threshold.value = 0.5
    labels, instances = segment.rethreshold(threaded=False)
    assert seg.data is labels and instances is None
    assert segment.status.value.startswith("Done: ") and "nuclei" not in segment.status.value.split("\n")[0]
    assert f"'{nuclei.name}' was deleted: the new thresholds remake the class map alone" in segment.status.value


def _assert_outlines_take_their_class_colour(viewer, seg, nuclei):
    """Each nucleus is drawn in the colour of its class (its majority in the class map), over the
    class map at a lower opacity; hovering a nucleus names its class."""
    from napari_medseg.nuclei.votes import instance_classes

    votes = instance_classes(nuclei.data, seg.data)
    ids = np.flatnonzero(votes)
    assert len(ids) > 20
    for nucleus in ids[:: max(1, len(ids) // 25)]:
        np.testing.assert_allclose(nuclei.colormap.map(int(nucleus))[:3], seg.colormap.map(int(votes[nucleus]))[:3])
    assert nuclei.opacity > seg.opacity and seg.opacity <= 0.5
    nucleus = int(ids[0])
    y, x = np.argwhere(nuclei.data == nucleus)[0]
    status = nuclei.get_status(nuclei.data_to_world((y, x)), world=True)
    assert f"class: {seg.metadata['medseg']['classes'][votes[nucleus]]}" in str(status), status


def test_legend_names_pick_the_class_to_paint(make_napari_viewer):
    """napari's label picker shows numbers only: Segment's legend picks classes by name."""
    viewer, segment, image, seg = _segmented(make_napari_viewer)
    assert 'href="class:3"' in segment.legend.value and '>epithelial</a>' in segment.legend.value
    viewer.layers.selection.active = image
    segment.legend.native.linkActivated.emit("class:3")
    # (the widget holds napari's proxy of the layer: compared by name, not identity)
    assert viewer.layers.selection.active.name == seg.name
    assert seg.selected_label == 3 and seg.mode == "paint"


def test_train_dock_folds_and_scrolls_beside_segment_and_metrics(make_napari_viewer, shots):
    """At 1600x1000 with Segment, Metrics and Train docked the window keeps its size and the
    canvas most of the width; Train's advanced settings start folded and its form scrolls."""
    from qtpy.QtWidgets import QApplication, QScrollArea

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "monuseg")
    for name in ("Segment", "Metrics"):
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
    dock, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    QApplication.processEvents()
    assert (window.width(), window.height()) == (1600, 1000)
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.5 * window.width(), canvas.width()
    assert not train.show_advanced.value and not train.advanced.native.isVisible()
    assert not train.lr.native.isVisible() and train.epochs.native.isVisible()
    scroll = dock.widget()
    assert isinstance(scroll, QScrollArea) and scroll.widget().isAncestorOf(train.train_button.native)
    scroll.ensureWidgetVisible(train.train_button.native)
    QApplication.processEvents()
    assert not train.train_button.native.visibleRegion().isEmpty()  # reachable by scrolling
    train.show_advanced.value = True
    QApplication.processEvents()
    assert train.lr.native.isVisible() and (window.width(), window.height()) == (1600, 1000)
    path = shots / "segment_metrics_train_1600x1000.png"
    window.grab().save(str(path))
    assert path.stat().st_size > 10_000


def test_rethreshold_is_fast_on_a_1000_px_image(tiny_checkpoint, consep):
    from napari_medseg.inference.rethreshold import iter_segment_keeping
    from napari_medseg.inference.segmenter import Segmenter
    from napari_medseg.io import read_image
    from napari_medseg.steps import run_steps

    image = np.tile(read_image(consep / "images" / "train_2_000.png"), (4, 4, 1))[:1000, :1000]
    segmenter = Segmenter.load(tiny_checkpoint, device="cpu")
    labels, instances, kept = run_steps(iter_segment_keeping(segmenter, image))
    np.testing.assert_array_equal(kept.result(Thresholds(segmenter.foreground_threshold))[0], labels)
    start = time.perf_counter()
    kept.result(Thresholds(0.3, 0.4, 20))
    assert time.perf_counter() - start < 2.0  # ~0.4 s measured; generous for a shared 2-core runner


def test_metrics_scores_against_nucleus_only_truth_with_classes_merged(make_napari_viewer, shots):
    viewer, segment, image, seg = _segmented(make_napari_viewer)
    truth, truth_instances = viewer.layers["MoNuSeg ground truth"], viewer.layers["MoNuSeg instances"]
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = seg, truth
    metrics.gt_instances.value = truth_instances
    report = metrics.compute()
    assert report["classes_merged"] and "merged" in metrics.summary.value
    assert list(metrics.table.value["index"])[:2] == ["background", "nucleus"]
    assert report["per_class"]["nucleus"]["dice"] > 0.6
    assert "nucleus" in metrics.legend.value
    # one number format: every score with four decimals ("-" where undefined, blank where none)
    table, delegate = metrics.table.native, metrics.table.native.itemDelegate()
    shown = {delegate.displayText(table.model().index(r, c).data(), table.locale())
             for r in range(table.rowCount()) for c in range(table.columnCount())}
    assert shown and all(text in ("", "-") or re.fullmatch(r"-?\d+(\.\d{4})?", text) for text in shown), shown
    # the layout keeps the image first: docks stay narrow whatever the status says
    from qtpy.QtWidgets import QApplication

    segment.status.value = "Done: " + ", ".join(f"class {i} 12.3%" for i in range(60))
    QApplication.processEvents()
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.5 * viewer.window._qt_window.width(), canvas.width()
    path = shots / "segment_metrics_1600x1000.png"
    viewer.window._qt_window.grab().save(str(path))
    assert path.stat().st_size > 10_000


def _segment_widget_on_the_sample(make_napari_viewer):
    """A viewer with the CoNSeP sample and the Segment widget as napari's menu opens it, set to it."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.image_layer.value = viewer.layers["CoNSeP H&E"]
    seg.device.value = "cpu"
    return viewer, seg


def test_a_rethreshold_under_way_never_lands_in_the_next_runs_layers(make_napari_viewer, qtbot):
    """Nudge the threshold, then segment a rectangle at once: the whole image's re-thresholded map
    had been written into the rectangle's new layers (wrong size, wrong place)."""
    viewer, seg = _segment_widget_on_the_sample(make_napari_viewer)
    whole = seg.run(threaded=False)
    assert whole.data.shape == (256, 256)
    # drawn in µm, the sample's units (0.25 µm/px): pixels (100, 100) up to (164, 164), its far edges out
    shapes = viewer.add_shapes([np.array([[100, 100], [100, 164], [164, 164], [164, 100]]) * 0.25],
                               shape_type="rectangle")
    seg.target.value, seg.shapes_layer.value = "drawn shape", shapes
    seg.threshold.value = 0.6
    worker = seg.rethreshold()  # the re-threshold of the whole image, under way ...
    region = seg.run(threaded=False)  # ... when the rectangle is segmented
    qtbot.waitUntil(lambda: worker.is_running is False, timeout=10_000)
    qtbot.wait(300)
    assert region.data.shape == (64, 64) and seg.last_instances_layer.data.shape == (64, 64)
    assert tuple(region.translate) == (25.0, 25.0)  # (100, 100) px, in µm


def test_deleting_the_class_layer_keeps_the_nuclei_following_the_threshold(make_napari_viewer, qtbot):
    """Kept the outlined nuclei only (the class colours deleted): a threshold change still remakes
    them (it had done nothing, silently)."""
    viewer, seg = _segment_widget_on_the_sample(make_napari_viewer)
    classes = seg.run(threaded=False)
    nuclei = seg.last_instances_layer
    before = len(np.unique(nuclei.data)) - 1
    viewer.layers.remove(classes)
    seg.threshold.value = 0.8
    assert seg.rethreshold(threaded=False) is not None
    after = len(np.unique(nuclei.data)) - 1
    assert after < before and f"{after} nuclei" in seg.status.value


def test_a_result_edited_by_hand_is_not_remade_by_a_threshold_change(make_napari_viewer):
    """Painted a missed nucleus, erased a false one, then touched a threshold box: the edits had
    gone, with no warning and no undo. The status says why nothing is remade; the next run uses it."""
    viewer, seg = _segment_widget_on_the_sample(make_napari_viewer)
    classes = seg.run(threaded=False)
    nuclei = seg.last_instances_layer
    classes.paint((20, 20), 3)
    gone = int(np.unique(nuclei.data)[1])
    nuclei.fill(tuple(np.argwhere(nuclei.data == gone)[0]), 0)
    edited_classes, edited_nuclei = classes.data.copy(), nuclei.data.copy()
    seg.threshold.value = 0.8
    assert seg.rethreshold(threaded=False) is None and "edited by hand" in seg.status.value
    assert np.array_equal(classes.data, edited_classes) and np.array_equal(nuclei.data, edited_nuclei)
    again = seg.run(threaded=False)  # a new run: new layers, which follow the thresholds again
    assert seg.rethreshold(threaded=False) is not None and again is not classes


def test_a_threshold_change_after_a_run_too_large_to_keep_says_it_applies_next_time(make_napari_viewer, monkeypatch):
    """Over KEEP_MAX_PIXELS (16 Mpx) no probabilities are kept: a 4200² image's nuclei had stayed
    at 0.34 under a box saying 0.60, without a word. Here the limit is lowered to the sample's
    size, so the same path is taken on a 256² image: the status says the thresholds wait."""
    from napari_medseg.inference import rethreshold

    monkeypatch.setattr(rethreshold, "KEEP_MAX_PIXELS", 256 * 256 - 1)
    viewer, seg = _segment_widget_on_the_sample(make_napari_viewer)
    classes = seg.run(threaded=False)
    before = classes.data.copy()
    assert seg.kept is None
    seg.threshold.value = 0.8
    assert "not remade for the new thresholds; they apply to the next run" in seg.status.value
    assert seg.status.value.startswith("Done:")  # the run's own summary stays above the note
    assert np.array_equal(classes.data, before)


def test_results_land_on_an_image_moved_with_the_transform_tool(make_napari_viewer):
    """napari's Transform tool moves a layer by its affine, not its translate: the results had
    been drawn where the image was, the region's too."""
    from napari.utils.transforms import Affine

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    image = viewer.layers["CoNSeP H&E"]
    image.affine = Affine(translate=(40, 60))  # as dragging the transform box by (40, 60) µm
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.image_layer.value, seg.device.value = image, "cpu"
    whole = seg.run(threaded=False)
    assert np.allclose(whole.data_to_world((0, 0)), (40, 60))
    # pixels (64, 32) up to (192, 160) of the moved image (0.25 µm/px): from (56, 68) µm
    shapes = viewer.add_shapes([(40, 60) + 0.25 * np.array([[64, 32], [64, 160], [192, 160], [192, 32]])],
                               shape_type="rectangle")
    seg.target.value, seg.shapes_layer.value = "drawn shape", shapes
    region = seg.run(threaded=False)
    assert region.metadata["medseg"]["origin"] == [64, 32]
    assert np.allclose(region.data_to_world((0, 0)), (56, 68))
    assert np.allclose(seg.last_instances_layer.data_to_world((0, 0)), (56, 68))


def test_segment_status_and_notes_are_whole_beside_metrics_and_train(make_napari_viewer, shots):
    """With Metrics and Train docked under it at 1600x1000, Segment's form scrolls inside its dock:
    its status (a gray image's note below it) and legend keep their wrapped height, and the run's
    end scrolls the dock to them (as every other dock of the plugin, it scrolls); nothing is cut off."""
    from qtpy.QtWidgets import QApplication, QScrollArea

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "monuseg")
    gray = viewer.add_image(np.asarray(viewer.layers[0].data)[..., 1], name="gray")
    dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    for name in ("Metrics", "Train"):
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
    segment.image_layer.value = gray
    segment.device.value = "cpu"
    QApplication.processEvents()  # the docks laid out, as a user sees them before Segment
    segment.run(threaded=False)
    QApplication.processEvents()
    assert "Note: " in segment.status.value and (window.width(), window.height()) == (1600, 1000)
    scroll = dock.widget()
    assert isinstance(scroll, QScrollArea) and scroll.widget().isAncestorOf(segment.status.native)
    # the run's end scrolled to them; the status wraps to several lines, the legend (one class) fits in one
    for label, lines in ((segment.status.native, 3), (segment.legend.native, 1)):
        assert label.height() >= label.heightForWidth(label.width()) >= lines * label.fontMetrics().lineSpacing()
        assert label.visibleRegion().boundingRect().height() == label.height()  # all of it
        assert label.width() > 0.9 * scroll.viewport().width()  # the dock's width: no empty label column beside it
    assert scroll.verticalScrollBar().value() > 0
    viewer.screenshot(str(shots / "segment_status_beside_metrics_train.png"), canvas_only=False)
