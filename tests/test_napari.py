"""The napari face driven through make_napari_viewer: reader, sample data, widgets, demo."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from napari.layers import Image, Labels

from napari_medseg._napari.metrics_widget import MetricsWidget
from napari_medseg._napari.reader import get_reader
from napari_medseg._napari.sample_data import consep_sample, monuseg_sample
from napari_medseg._napari.segment_widget import DEFAULT_MODEL, FILE_MODEL, SegmentWidget
from napari_medseg.models import DEFAULT_MODEL_PATH

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def _add(viewer, layer_data):
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layer_data]


def _use_checkpoint(widget: SegmentWidget, path) -> None:
    widget.model_source.value = FILE_MODEL
    widget.checkpoint.value = path


# -- reader -------------------------------------------------------------------------------
def test_reader_opens_real_png_through_napari(make_napari_viewer, consep):
    viewer = make_napari_viewer()
    path = consep / "images" / "train_1_000.png"
    assert get_reader(str(path)) is not None
    layers = viewer.open(str(path), plugin="napari-medseg")
    assert len(layers) == 1 and isinstance(layers[0], Image)
    assert layers[0].rgb and layers[0].data.shape == (256, 256, 3)


def test_reader_opens_a_dataset_folder_as_layers_per_image_and_says_what_it_left(make_napari_viewer,
                                                                                  small_consep):
    from napari.utils.notifications import notification_manager

    from napari_medseg._napari.reader import DATASET_OPEN_LIMIT
    from napari_medseg.io import read_image, read_label_map

    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    layers = viewer.open(str(small_consep), plugin="napari-medseg")
    stems = sorted(p.stem for p in (small_consep / "images").iterdir())[:DATASET_OPEN_LIMIT]
    assert DATASET_OPEN_LIMIT == 4 and len(stems) == 4  # 6 images: 4 opened, 2 left
    # the first image's set last: on top, and its ground truth the layer napari selects (a hidden
    # instance map had been selected, and took a newcomer's first brush stroke unseen)
    assert [layer.name for layer in layers] == [f"{s}{suffix}" for s in reversed(stems)
                                                for suffix in ("", " instances", " ground truth")]
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels", "Labels"] * 4
    assert viewer.layers.selection.active is layers[-1] and layers[-1].visible
    for i, stem in enumerate(stems):  # each set holds that image's own pixels and maps
        image, instances, truth = layers[3 * (3 - i): 3 * (3 - i) + 3]
        assert image.rgb and np.array_equal(image.data, read_image(small_consep / "images" / f"{stem}.png"))
        assert np.array_equal(truth.data, read_label_map(small_consep / "labels" / f"{stem}.tif"))
        assert np.array_equal(instances.data, read_label_map(small_consep / "instances" / f"{stem}.tif"))
        assert image.metadata == {"dataset": str(small_consep), "stem": stem}
        assert truth.metadata["medseg"]["classes"] == CONSEP_CLASSES
        assert list(truth.features["class"]) == CONSEP_CLASSES
        # the first image is in view; the others wait hidden; instances are hidden under the classes
        assert (image.visible, truth.visible, instances.visible) == ((True, True, False) if i == 0 else
                                                                     (False, False, False))
        assert instances.data.max() > 10
    truth = layers[-1]
    # fixed colours: 'inflammatory' (id 2) is green, background transparent
    assert np.allclose(truth.colormap.map(np.array([2]))[0][:3], [0, 200 / 255, 0])
    assert truth.colormap.map(np.array([0]))[0][3] == 0
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("Opened 4 of the 6 images of 'consep_small'" in m and "2 more not opened" in m
               and "images/" in m for m in messages), messages


def test_reader_opens_a_small_dataset_folder_whole_without_a_notification(make_napari_viewer, small_consep):
    from napari.utils.notifications import notification_manager

    for stem in ("train_3_005", "train_3_006"):  # 4 images left: all open
        for sub, ext in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
            (small_consep / sub / f"{stem}{ext}").unlink()
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    layers = viewer.open(str(small_consep), plugin="napari-medseg")
    assert [layer.name for layer in layers if isinstance(layer, Image)] == [
        "train_2_006", "train_2_005", "train_1_006", "train_1_005"]
    assert len(layers) == 12
    assert not [n for n in notification_manager.records[before:] if "Opened" in str(n.message)]


def test_reader_opens_pannuke_fold(make_napari_viewer, tmp_path, consep):
    from napari_medseg.io.dataset import open_dataset

    ds = open_dataset(consep)
    samples = [ds.load(s) for s in ds.stems[:3]]
    images = np.stack([s.image for s in samples]).astype(np.float64)
    masks = np.zeros((3, 256, 256, 6))
    for i, s in enumerate(samples):
        for c in range(1, 5):
            masks[i, ..., c - 1] = np.where(s.labels == c, s.instances, 0)
        masks[i, ..., 5] = s.labels == 0
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    np.save(tmp_path / "types.npy", np.array(["Colon"] * 3))
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path), plugin="napari-medseg")
    image, _, classes = layers
    assert image.data.shape == (3, 256, 256, 3)
    assert classes.metadata["medseg"]["classes"][1] == "neoplastic"
    from napari_medseg._napari.layers import pixel_size_um

    assert pixel_size_um(image) == 0.25  # 40x: Segment runs it as it is, Objects gives µm²
    # PanNuke channel c holds class c+1, so the class map equals CoNSeP's labels here
    np.testing.assert_array_equal(np.asarray(classes.data[1]), samples[1].labels)


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "rgba16", "fivedim", "empty"])
def test_reader_bad_files_raise_clear_errors_and_add_nothing(make_napari_viewer, tmp_path, consep, bad):
    viewer = make_napari_viewer()
    if bad == "corrupt":
        path = tmp_path / "corrupt.tif"
        path.write_bytes(b"II*\x00 this is not a tiff at all")
        match = "corrupt, truncated"
    elif bad == "truncated":
        path = tmp_path / "cut.png"
        data = (consep / "images" / "train_1_000.png").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        match = "corrupt, truncated"
    elif bad == "rgba16":  # accepted: RGBA drops alpha, 16-bit kept
        path = tmp_path / "rgba16.tif"
        tifffile.imwrite(path, np.random.default_rng(0).integers(0, 4096, (64, 64, 4), dtype=np.uint16))
        match = None
    elif bad == "fivedim":
        path = tmp_path / "5d.tif"
        tifffile.imwrite(path, np.zeros((2, 3, 4, 32, 32), np.uint8))
        match = "not a 2-D gray, RGB or RGBA image"
    else:
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
        match = "empty"
    reader = get_reader(str(path))
    if match is None:
        (data, kwargs, kind), = reader(str(path))
        assert data.shape == (64, 64, 3) and data.dtype == np.uint16
        return
    with pytest.raises(ValueError, match=match):
        reader(str(path))
    assert len(viewer.layers) == 0


def test_reader_declines_unknown_things(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a plain folder without images
    np.save(tmp_path / "random.npy", np.zeros(3))
    assert get_reader(str(tmp_path / "random.npy")) is None


# -- sample data --------------------------------------------------------------------------
def test_sample_data_is_real_and_consistent(make_napari_viewer):
    viewer = make_napari_viewer()
    image, instances, truth = _add(viewer, consep_sample())
    assert image.data.shape == (256, 256, 3) and image.rgb
    assert set(np.unique(truth.data)) <= set(range(5)) and len(np.unique(truth.data)) == 5
    assert np.array_equal(truth.data > 0, instances.data > 0)
    image2, inst2, truth2 = _add(viewer, monuseg_sample())
    assert image2.data.shape == (512, 512, 3) and inst2.data.max() > 50
    assert truth2.metadata["medseg"]["classes"] == ["background", "nucleus"]


def test_sample_data_listed_in_napari_menu():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    keys = {c.key for c in pm.get_manifest("napari-medseg").contributions.sample_data}
    assert keys == {"consep", "monuseg"}


# -- segment widget -----------------------------------------------------------------------
def test_segment_widget_default_model_on_sample(make_napari_viewer):
    assert DEFAULT_MODEL_PATH.is_file(), "the shipped default model is missing"
    viewer = make_napari_viewer()
    image, _, truth = _add(viewer, consep_sample())
    widget = SegmentWidget(viewer)
    assert widget.image_layer.value is image  # the only image layer is preselected
    assert widget.model_source.value == DEFAULT_MODEL
    layer = widget.run(threaded=False)
    assert isinstance(layer, Labels) and layer.name == "CoNSeP H&E segmentation"
    assert layer.data.shape == (256, 256) and layer.data.dtype == np.uint8
    assert layer.metadata["medseg"]["classes"] == CONSEP_CLASSES
    # a real model: nuclei found where the pathologists drew them
    pred_fg, gt_fg = layer.data > 0, truth.data > 0
    dice = 2 * (pred_fg & gt_fg).sum() / (pred_fg.sum() + gt_fg.sum())
    # a real model on a held-out image: far above trivial answers (all-nucleus gives 0.52, empty 0)
    assert dice > 0.6, dice
    assert widget.progress.value == widget.progress.max > 0


def test_segment_widget_threaded_run_and_options(make_napari_viewer, qtbot, tiny_checkpoint, consep):
    viewer = make_napari_viewer()
    from napari_medseg.io import read_image

    viewer.add_image(read_image(consep / "images" / "train_2_000.png"), name="patch")
    widget = SegmentWidget(viewer)
    _use_checkpoint(widget, tiny_checkpoint)
    widget.device.value = "cpu"
    widget.tile_size.value = 128
    widget.overlap.value = 32
    widget.batch_size.value = 2
    worker = widget.run()
    assert worker is not None, widget.status.value
    handing_off = []  # right after the widget took the result: its layers still to go in
    worker.returned.connect(lambda _: handing_off.append((widget.run_button.enabled, widget.cancel_button.enabled)))
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert handing_off == [(False, False)]  # nothing left to cancel, Run not yet back
    # the layers go in a step per turn; the Run button comes back with the last step
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=5_000)
    assert len(viewer.layers) == 3 and all(layer.visible for layer in viewer.layers)
    seg, nuclei = viewer.layers[-2], viewer.layers[-1]
    assert seg.name == "patch segmentation" and seg.data.shape == (256, 256)
    assert nuclei.name == "patch nuclei" and nuclei.metadata["medseg"]["kind"] == "instances"
    assert nuclei.data.shape == (256, 256) and ((nuclei.data > 0) <= (seg.data > 0)).all()
    # 3x3 tiles of 128 with overlap 32, then the nuclei step's whole-image steps
    from napari_medseg.nuclei.watershed import INSTANCE_STEPS

    assert widget.progress.max == 9 + INSTANCE_STEPS and widget.progress.value == widget.progress.max
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_segment_widget_cancel_adds_nothing(make_napari_viewer, qtbot, tiny_checkpoint, consep):
    viewer = make_napari_viewer()
    big = np.tile(read_rgb(consep / "images" / "train_3_000.png"), (4, 4, 1))  # 1024x1024 real H&E
    viewer.add_image(big, name="big")
    widget = SegmentWidget(viewer)
    _use_checkpoint(widget, tiny_checkpoint)
    widget.tile_size.value = 64
    widget.overlap.value = 32
    widget.batch_size.value = 1
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=30_000)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        widget.cancel()
    assert widget.progress.value < widget.progress.max
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert "Cancelled" in widget.status.value
    assert widget.run_button.enabled


def read_rgb(path):
    from napari_medseg.io import read_image

    return read_image(path)


# a stack (a PanNuke fold) is no bad input: its shown plane is segmented (test_review2_files_widgets.py)
@pytest.mark.parametrize("case", ["pickle", "missing", "wrong_classes", "overlap", "no_image"])
def test_segment_widget_bad_input_reports_and_adds_nothing(make_napari_viewer, tmp_path, tiny_checkpoint, case):
    import torch

    viewer = make_napari_viewer()
    if case != "no_image":
        data = np.zeros((64, 64, 3), np.uint8)
        viewer.add_image(data, name="img")
    widget = SegmentWidget(viewer)
    _use_checkpoint(widget, tiny_checkpoint)
    if case == "pickle":
        bad = tmp_path / "model.safetensors"
        torch.save({"weights": torch.zeros(3)}, bad)
        _use_checkpoint(widget, bad)
        expected = "pickle"
    elif case == "missing":
        _use_checkpoint(widget, tmp_path / "nope.safetensors")
        expected = "existing .safetensors"
    elif case == "wrong_classes":
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(tiny_checkpoint), "pt") as fh:
            meta = fh.metadata()
        state = load_file(str(tiny_checkpoint))
        head = [k for k in state if k.startswith("segmentation_head") and k.endswith("weight")][0]
        state[head] = state[head][:3].clone()
        state[head.replace("weight", "bias")] = state[head.replace("weight", "bias")][:3].clone()
        bad = tmp_path / "three.safetensors"
        save_file(state, str(bad), metadata=meta)
        _use_checkpoint(widget, bad)
        expected = "another class count"
    elif case == "overlap":
        widget.tile_size.value = 64
        widget.overlap.value = 64
        expected = "smaller than the tile"
    else:
        expected = "Choose an image layer"
    n_before = len(viewer.layers)
    assert widget.run(threaded=False) is None
    assert expected in widget.status.value, widget.status.value
    assert len(viewer.layers) == n_before
    assert widget.run_button.enabled


# -- metrics widget -----------------------------------------------------------------------
def test_metrics_widget_table_matches_core(make_napari_viewer):
    from napari_medseg.evaluation.report import evaluate_maps
    from skimage.morphology import binary_dilation, disk

    viewer = make_napari_viewer()
    _, _, truth = _add(viewer, consep_sample())
    # a realistic 'prediction': ground truth grown by 2 px, spindle relabelled epithelial
    pred = np.where(binary_dilation(truth.data > 0, disk(2)) & (truth.data == 0), 3, truth.data).astype(np.uint8)
    pred[truth.data == 4] = 3
    from napari_medseg._napari.layers import class_labels_kwargs

    pred_layer = viewer.add_labels(pred, **class_labels_kwargs("pred", CONSEP_CLASSES))
    widget = MetricsWidget(viewer)
    widget.prediction.value = pred_layer
    widget.ground_truth.value = truth
    result = widget.compute()
    expected = evaluate_maps(truth.data, pred, CONSEP_CLASSES)
    assert result["overall"]["miou"] == pytest.approx(expected["overall"]["miou"], abs=1e-12)
    value = widget.table.value
    assert list(value["index"][:5]) == CONSEP_CLASSES and value["index"][-1].startswith("overall")
    assert list(value["columns"][:4]) == ["IoU", "Dice", "Precision", "Recall"]
    assert value["data"][4][1] == expected["per_class"]["spindle"]["dice"] == 0.0  # all spindle became epithelial
    assert float(value["data"][3][3]) == pytest.approx(expected["per_class"]["epithelial"]["recall"], abs=1e-4)
    assert "mIoU" in widget.summary.value


def test_metrics_widget_uses_chosen_instance_layers_that_follow_the_painted_prediction(make_napari_viewer):
    from napari_medseg._napari.layers import class_labels_kwargs, instance_labels_kwargs
    from napari_medseg.evaluation.report import evaluate_maps

    viewer = make_napari_viewer()
    _, truth_instances, truth = _add(viewer, consep_sample())
    pred_layer = viewer.add_labels(truth.data.copy(), **class_labels_kwargs("pred", CONSEP_CLASSES))
    # the annotated nuclei as the 'predicted' instances: instance metrics become perfect
    inst_layer = viewer.add_labels(truth_instances.data.copy(), **instance_labels_kwargs("pred nuclei"))
    widget = MetricsWidget(viewer)
    widget.prediction.value, widget.ground_truth.value = pred_layer, truth
    widget.gt_instances.value = truth_instances
    derived = widget.compute()["overall"]
    assert derived["bpq"] < 0.95  # the watershed of the class map does not find every annotated nucleus
    widget.pred_instances.value = inst_layer
    given = widget.compute()["overall"]
    assert given["bpq"] == pytest.approx(1.0) and given["aji"] == pytest.approx(1.0)
    expected = evaluate_maps(truth.data, truth.data, CONSEP_CLASSES, truth_instances.data, truth_instances.data)
    assert given["mpq"] == pytest.approx(expected["overall"]["mpq"])
    # an annotated nucleus erased from the class map: the chosen nuclei follow the edit (that nucleus
    # goes), they are not derived anew by a watershed of the whole map (which had moved every score)
    nucleus = int(truth_instances.data[truth_instances.data > 0][0])
    pred_layer.data_setitem(np.nonzero(truth_instances.data == nucleus), 0)  # as napari's tools paint
    assert widget.pred_instances.value is inst_layer and "follows the painted prediction" in widget._instances_note
    edited = widget.compute()["overall"]
    expected = evaluate_maps(truth.data, pred_layer.data, CONSEP_CLASSES, truth_instances.data,
                             np.where(truth_instances.data == nucleus, 0, truth_instances.data))
    assert edited["bpq"] == pytest.approx(expected["overall"]["bpq"]) and 0.97 < edited["bpq"] < 1.0


def test_metrics_widget_scores_a_nucleus_only_prediction_against_classed_truth(make_napari_viewer):
    """A binary model's result (background / nucleus) against CoNSeP's classed ground truth: scored
    nucleus vs background, the ground truth's classes merged and the panel says so (it was refused)."""
    from napari_medseg._napari.layers import class_labels_kwargs
    from napari_medseg.evaluation.report import evaluate_maps

    viewer = make_napari_viewer()
    _, _, truth = _add(viewer, consep_sample())
    binary = (np.roll(truth.data, 3, axis=0) > 0).astype(np.uint8)
    pred = viewer.add_labels(binary, **class_labels_kwargs("binary", ["background", "nucleus"]))
    widget = MetricsWidget(viewer)
    widget.prediction.value, widget.ground_truth.value = pred, truth
    overall = widget.compute()["overall"]
    expected = evaluate_maps((truth.data > 0).astype(np.uint8), binary, ["background", "nucleus"])["overall"]
    assert overall["nucleus_dice"] == pytest.approx(expected["nucleus_dice"], abs=1e-12)
    assert "merged into 'nucleus'" in widget.summary.value


# other class names than the ground truth's are scored nucleus vs background, and said
# (test_napari_pannuke_metrics): no longer bad input
@pytest.mark.parametrize("case", ["shape", "class_ids", "same"])
def test_metrics_widget_bad_input_keeps_previous_table(make_napari_viewer, case):
    from napari_medseg._napari.layers import class_labels_kwargs

    viewer = make_napari_viewer()
    _, _, truth = _add(viewer, consep_sample())
    good = viewer.add_labels(truth.data.copy(), **class_labels_kwargs("copy", CONSEP_CLASSES))
    widget = MetricsWidget(viewer)
    widget.prediction.value, widget.ground_truth.value = good, truth
    assert widget.compute()["overall"]["miou"] == 1.0
    before = widget.table.value
    if case == "shape":
        bad = viewer.add_labels(np.zeros((100, 100), np.uint8), **class_labels_kwargs("bad", CONSEP_CLASSES))
        expected = "shape"
    elif case == "class_ids":
        data = truth.data.copy()
        data[:5, :5] = 9
        bad = viewer.add_labels(data, **class_labels_kwargs("bad", CONSEP_CLASSES))
        expected = "class id 9"
    else:
        bad = truth
        expected = "same layer"
    widget.prediction.value = bad
    assert widget.compute() is None
    assert expected in widget.summary.value
    assert widget.table.value == before


# -- demo ---------------------------------------------------------------------------------
def test_demo_segments_sample_and_fills_metrics(make_napari_viewer):
    from napari_medseg._napari.demo import build_demo

    viewer = make_napari_viewer()
    segment, metrics = build_demo(viewer)
    names = [layer.name for layer in viewer.layers]
    assert names == ["CoNSeP H&E", "CoNSeP instances", "CoNSeP ground truth", "CoNSeP H&E segmentation",
                     "CoNSeP H&E nuclei"]
    assert metrics.result is not None and metrics.result["overall"]["nucleus_dice"] > 0.6
    # instance metrics against the annotated nuclei, with the nuclei the Segment widget made
    assert metrics.gt_instances.value is viewer.layers["CoNSeP instances"]
    assert metrics.pred_instances.value is viewer.layers["CoNSeP H&E nuclei"]
    assert len(metrics.table.value["data"]) == 6


def test_segment_status_names_the_image_being_segmented(make_napari_viewer, qtbot, tiny_checkpoint, consep):
    """The image box changed while a run goes (the user picks the next image): the status still
    names the image the run segments, whose result it adds."""
    viewer = make_napari_viewer()
    first = viewer.add_image(read_rgb(consep / "images" / "train_3_000.png"), name="first")
    second = viewer.add_image(read_rgb(consep / "images" / "train_3_001.png"), name="second")
    widget = SegmentWidget(viewer)
    _use_checkpoint(widget, tiny_checkpoint)
    widget.image_layer.value = first
    widget.tile_size.value, widget.overlap.value, widget.batch_size.value = 64, 32, 1  # many steps
    seen = []

    def done():
        seen.append(widget.status.value)
        return widget.run_button.enabled and widget.status.value.startswith("Done")

    widget.run()
    widget.image_layer.value = second
    qtbot.waitUntil(done, timeout=60_000)
    running = [s for s in seen if s.startswith(("Loading", "Segmenting"))]
    assert "Segmenting 'first'..." in running and not any("second" in s for s in running), running
    assert [layer.name for layer in viewer.layers][2:] == ["first segmentation", "first nuclei"]


def test_threshold_arrows_step_from_the_models_own_value_in_the_docked_widget(make_napari_viewer):
    """Docked and shown (its form scrolls), Segment's threshold boxes at "model's (0.40)" still step
    to 0.35 with the down arrow: the box's own step rule, taken by Qt as the form laid it out,
    had left Down disabled at the box's minimum."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    own = widget._chosen_values[1].marker_threshold
    assert widget.marker_threshold.value == 0 and own > 0.1
    QTest.keyClick(widget.marker_threshold.native, Qt.Key.Key_Down)
    assert widget.marker_threshold.value == pytest.approx(own - 0.05)
    QTest.keyClick(widget.threshold.native, Qt.Key.Key_Down)
    assert widget.threshold.value == pytest.approx(widget._chosen_values[0] - 0.01)
