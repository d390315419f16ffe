"""Reading results at a glance, as a user meets them through Plugins > napari-medseg: Segment on
the MoNuSeg sample with the shipped model (nuclei outlined, legend, one count, layers placed on
the image), re-thresholded without the network, scored by Metrics against nucleus-only ground
truth with the classes merged, and a layout at 1600x1000 that leaves the image most of the window."""

from __future__ import annotations

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
    # the layout keeps the image first: docks stay narrow whatever the status says
    from qtpy.QtWidgets import QApplication

    segment.status.value = "Done: " + ", ".join(f"class {i} 12.3%" for i in range(60))
    QApplication.processEvents()
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.5 * viewer.window._qt_window.width(), canvas.width()
    path = shots / "segment_metrics_1600x1000.png"
    viewer.window._qt_window.grab().save(str(path))
    assert path.stat().st_size > 10_000
