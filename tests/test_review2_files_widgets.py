"""Segment on one plane of a stack (a PanNuke fold), Metrics scoring Segment's own nuclei by
default, and the TP / FP / FN overlay taking the units of the prediction it is reused for."""

from __future__ import annotations

import numpy as np
import pytest

PLUGIN = "napari-medseg"


@pytest.fixture
def fold(tmp_path, consep):
    """A PanNuke-style fold of 6 real CoNSeP patches (images.npy, masks.npy, types.npy)."""
    from napari_medseg.io import read_image
    from napari_medseg.io.images import read_label_map

    stems = sorted(p.stem for p in (consep / "images").glob("train_1_*.png"))[:6]
    images = np.stack([read_image(consep / "images" / f"{s}.png") for s in stems]).astype(np.float64)
    masks = np.zeros((len(stems), 256, 256, 6))
    for i, stem in enumerate(stems):
        labels, nuclei = (read_label_map(consep / sub / f"{stem}.tif") for sub in ("labels", "instances"))
        for c in range(1, 5):
            masks[i, ..., c - 1] = nuclei * (labels == c)
        masks[i, ..., 5] = nuclei == 0
    root = tmp_path / "fold1"
    root.mkdir()
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    np.save(root / "types.npy", np.array(["Colon"] * len(stems)))
    return root, images.astype(np.uint8)


@pytest.fixture(scope="module")
def pannuke_checkpoint(tmp_path_factory):
    """An untrained tiny U-Net (depth 3) for PanNuke's classes, as a fold's ground truth names them."""
    import torch

    from napari_medseg.io.pannuke import PANNUKE_CLASSES
    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig("unet", "resnet18", num_classes=len(PANNUKE_CLASSES), encoder_depth=3)
    meta = CheckpointMeta(model=cfg, classes=list(PANNUKE_CLASSES))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "pannuke.safetensors", build_model(cfg).eval(), meta)


def _segment(viewer, checkpoint=None):
    from napari_medseg._napari.segment_widget import FILE_MODEL

    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.device.value = "cpu"
    if checkpoint is not None:
        widget.model_source.value, widget.checkpoint.value, widget.backend.value = FILE_MODEL, checkpoint, "torch"
    return widget


@pytest.mark.usefixtures("one_torch_thread")
def test_segment_takes_the_plane_shown_of_a_stack_and_its_result_lands_there(make_napari_viewer, fold,
                                                                             pannuke_checkpoint, tmp_path):
    from napari_medseg.inference import Segmenter

    root, images = fold
    viewer = make_napari_viewer()
    stack, truth_nuclei, truth = viewer.open(root, plugin=PLUGIN)
    viewer.dims.set_current_step(0, 3)  # the slider on the 4th image
    widget = _segment(viewer, pannuke_checkpoint)
    widget.image_layer.value = stack
    result = widget.run(threaded=False)  # was refused: "'PanNuke fold1' is a stack of 6 images ..."
    assert result is not None, widget.status.value
    assert widget.status.value.startswith("Done: ") and "nuclei" in widget.status.value
    assert "Note: 'PanNuke fold1' is a stack: the image shown (slider at 3 of 0-5) was segmented" in widget.status.value
    assert result.data.shape == (1, 256, 256) and result.name == "PanNuke fold1 [3] segmentation"
    expected = Segmenter.load(pannuke_checkpoint, device="cpu").segment(images[3], widget.tile_settings())
    np.testing.assert_array_equal(result.data[0], expected)
    nuclei = widget.last_instances_layer
    for layer in (result, nuclei):  # on that plane only: on the others nothing of it shows
        assert layer.data.shape == (1, 256, 256)
        assert np.allclose(layer.data_to_world((0, 0, 0)), (3, 0, 0))
    # saved through napari's save dialog's call (its writer chosen, the layer's name bare): the one
    # plane is written, under the format's suffix (both had been refused as 3-D, the name left bare)
    from npe2 import PluginManager

    writers = {w.command.rsplit(".", 1)[-1]: w for w in PluginManager.instance().iter_compatible_writers(["labels"])}
    for layer, writer, suffix in ((result, "write_label_tiff", ".tif"), (nuclei, "write_geojson", ".geojson")):
        viewer.layers.selection = {layer}
        bare = tmp_path / layer.name
        assert viewer.layers.save(str(bare), selected=True, _writer=writers[writer]) == [f"{bare}{suffix}"]
    reopened = viewer.open(tmp_path / f"{result.name}.tif", plugin=PLUGIN)[0]
    np.testing.assert_array_equal(reopened.data, expected)
    assert reopened.metadata["medseg"]["kind"] == "classes"
    for step in range(6):
        viewer.dims.set_current_step(0, step)
        drawn = result._slice.image.raw
        assert (drawn.size > 0 and np.array_equal(drawn, expected)) if step == 3 else not result._slice.image.raw.any()
    # Metrics scores it against the fold's ground truth of that plane (its plane only is read)
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = result, truth
    metrics.gt_instances.value = truth_nuclei
    assert metrics.pred_instances.value is nuclei
    report = metrics.compute()
    assert report is not None, metrics.summary.value
    from napari_medseg.evaluation.report import evaluate_maps

    by_hand = evaluate_maps(np.asarray(truth.data[3]), result.data[0], list(truth.metadata["medseg"]["classes"]),
                            gt_instances=np.asarray(truth_nuclei.data[3]), pred_instances=nuclei.data[0])
    assert report["overall"]["nucleus_dice"] == pytest.approx(by_hand["overall"]["nucleus_dice"])
    overlay = metrics.show_errors()
    assert overlay.data.shape == (1, 256, 256) and np.allclose(overlay.data_to_world((0, 0, 0)), (3, 0, 0))
    # a new threshold remakes the plane's layers in their shape
    widget.threshold.value = 0.6
    labels, _ = widget.rethreshold(threaded=False)
    np.testing.assert_array_equal(result.data[0], labels)
    assert "the image shown (slider at 3 of 0-5)" in widget.status.value  # still said


def test_metrics_scores_segments_own_nuclei_by_default(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")  # docked before the run too
    segment = _segment(viewer)
    prediction = segment.run(threaded=False)
    nuclei = segment.last_instances_layer
    metrics.prediction.value, metrics.ground_truth.value = prediction, viewer.layers["CoNSeP ground truth"]
    assert metrics.pred_instances.value is nuclei  # was 'derive from class map (watershed)'
    default = metrics.compute()["overall"]["bpq"]
    metrics.pred_instances.value = nuclei
    assert metrics.compute()["overall"]["bpq"] == default
    metrics.pred_instances.value = None  # the user's choice stays, even as layers come
    viewer.add_labels(np.zeros((4, 4), np.uint8), name="other")
    assert metrics.pred_instances.value is None
    # another prediction (the ground truth scored against itself): Segment's nuclei are not its own
    metrics.pred_instances.value = nuclei
    metrics.prediction.value = viewer.layers["CoNSeP ground truth"]
    assert metrics.pred_instances.value is None
    metrics.pred_instances.value = viewer.layers["CoNSeP instances"]  # the user's choice stays
    viewer.add_labels(np.zeros((4, 4), np.uint8), name="another")
    assert metrics.pred_instances.value.name == "CoNSeP instances"
    # a painted prediction keeps the nuclei chosen for it, which follow the edit (they had been dropped
    # for nuclei derived anew: every score moved, not only by the edit)
    metrics.prediction.value = prediction
    chosen = metrics.pred_instances.value
    prediction.paint((10, 10), 3)
    assert metrics.pred_instances.value is chosen and "follows the painted prediction" in metrics._instances_note


def test_the_overlay_reused_for_another_prediction_takes_its_units(make_napari_viewer, consep):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")  # in µm
    segment = _segment(viewer)
    in_um = segment.run(threaded=False)
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = in_um, viewer.layers["CoNSeP ground truth"]
    overlay = metrics.show_errors()
    assert [str(u) for u in overlay.units] == ["micrometer"] * 2 and tuple(overlay.scale) == (0.25, 0.25)
    image = viewer.open(consep / "images" / "train_1_005.png", plugin=PLUGIN)[0]  # a PNG: pixels
    truth = viewer.open(consep / "labels" / "train_1_005.tif", plugin=PLUGIN)[0]
    segment.image_layer.value = image
    in_px = segment.run(threaded=False)
    metrics.prediction.value, metrics.ground_truth.value = in_px, truth
    again = metrics.show_errors()
    assert [layer.name for layer in viewer.layers].count(again.name) == 1  # reused ...
    assert [str(u) for u in again.units] == [str(u) for u in in_px.units] == ["pixel"] * 2  # ... was µm
    assert tuple(again.scale) == (1, 1)
    np.testing.assert_allclose(again.extent.world, in_px.extent.world)
