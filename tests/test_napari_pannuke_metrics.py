"""The README's PanNuke walk-through to its end: a fold opened, Segment on the patch shown, Metrics
against the fold's ground truth. PanNuke names five nucleus classes, the default model CoNSeP's
others: nuclei are still nuclei, so nucleus vs background is scored and said (it had ended in
'The ground truth's classes ... differ from the prediction's')."""

from __future__ import annotations

import numpy as np
import pytest

from test_napari_objects import _consep_fold

PLUGIN = "napari-medseg"


def test_metrics_on_a_pannuke_patch_scores_nuclei_when_the_classes_are_others(make_napari_viewer, tmp_path, consep):
    from napari.layers import Labels

    from napari_medseg.evaluation.report import evaluate_maps

    _consep_fold(tmp_path, consep)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path), plugin=PLUGIN)
    viewer.dims.set_current_step(0, 1)
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    prediction = seg.run(threaded=False)
    nuclei = seg.last_instances_layer
    truth, truth_nuclei = (next(layer for layer in viewer.layers if isinstance(layer, Labels)
                                and layer.data.ndim == 3 and layer.metadata["medseg"].get("kind") == kind)
                           for kind in ("classes", "instances"))
    assert truth.metadata["medseg"]["classes"] != prediction.metadata["medseg"]["classes"]
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = prediction, truth
    metrics.gt_instances.value, metrics.pred_instances.value = truth_nuclei, nuclei
    report = metrics.compute()
    assert report is not None, metrics.summary.value
    assert "are not the prediction's" in metrics.summary.value and "nucleus vs background" in metrics.summary.value
    assert list(report["per_class"]) == ["background", "nucleus"]
    by_hand = evaluate_maps((np.asarray(truth.data[1]) > 0).astype(np.uint8),
                            (prediction.data.reshape(256, 256) > 0).astype(np.uint8), ["background", "nucleus"],
                            gt_instances=np.asarray(truth_nuclei.data[1]), pred_instances=nuclei.data.reshape(256, 256))
    assert report["overall"]["nucleus_dice"] == pytest.approx(by_hand["overall"]["nucleus_dice"])
    assert report["overall"]["nucleus_dice"] > 0.7
    assert report["overall"]["bpq"] == pytest.approx(by_hand["overall"]["bpq"])
    overlay = metrics.show_errors()
    assert overlay is not None and set(np.unique(overlay.data)) <= {0, 1, 2, 3}
