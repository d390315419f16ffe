"""The Train widget driven through make_napari_viewer on real CoNSeP patches with tiny models.

Non-threaded runs train in the test's thread; the threaded run goes through the real path
(training thread -> queue -> napari thread worker -> GUI slots) and waits with qtbot.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medseg._napari.model_list import trained_models
from napari_medseg._napari.segment_widget import SegmentWidget
from napari_medseg._napari.train_widget import (DEFAULT_MODEL, STOPPING, FILE_MODEL, FROM_FOLDER, FROM_LAYERS,
                                                NEW_MODEL, PREVIEW_KIND, TrainWidget)
from napari_medseg.models import load_checkpoint, read_meta
from napari_medseg.training.tiles import TileInputError, layer_items, tile_bounds
from napari_medseg.training.trainer import BatchDone, EpochDone, TrainingDone

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def _tiny(widget: TrainWidget, out_dir, epochs: int = 2, name: str = "tiny") -> None:
    """A tiny U-Net from scratch, 64-pixel crops, CPU."""
    widget.start_from.value = NEW_MODEL
    widget.architecture.value = "unet"
    widget.encoder.value = "resnet18"
    widget.encoder_depth.value = 3
    _fast(widget, out_dir, epochs, name)


def _fast(widget: TrainWidget, out_dir, epochs: int, name: str) -> None:
    widget.crop_size.value = 64
    widget.batch_size.value = 4
    widget.epochs.value = epochs
    widget.lr.value = 0.003
    widget.device.value = "cpu"
    widget.output_dir.value = str(out_dir)
    widget.model_name.value = name


def _fine_tune_form(viewer, checkpoint, folder, out_dir, name: str) -> TrainWidget:
    """Plugins > Train, filled in to fine-tune ``checkpoint`` on a dataset folder for one epoch."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    _fast(widget, out_dir, epochs=1, name=name)
    widget.start_from.value = FILE_MODEL
    widget.checkpoint.value = str(checkpoint)
    widget.source.value = FROM_FOLDER
    widget.dataset.value = str(folder)
    widget.val_fraction.value = 0.34
    return widget


def _painted(viewer, consep, stem="train_1_005"):
    from napari_medseg.io import read_image

    image = viewer.add_image(read_image(consep / "images" / f"{stem}.png"), name="H&E", rgb=True)
    labels = viewer.add_labels(tifffile.imread(consep / "labels" / f"{stem}.tif").astype(np.uint8), name="painted")
    return image, labels


def _preview_layers(viewer):
    return [l for l in viewer.layers if l.metadata.get("medseg", {}).get("kind") in (PREVIEW_KIND, "preview-image")]


def _assert_plot_shows_every_point(plot):
    """Every drawn point lies inside the axes (none on the frame), the first epoch's too."""
    plot.join()  # drawn on the plot's own thread
    (x0, x1), (y0, y1) = plot.loss_ax.get_xlim(), plot.loss_ax.get_ylim()
    for name in ("batch_loss", "train_loss", "val_loss"):
        xs, ys = plot.lines[name].get_data()
        assert len(xs) >= 1 and plot.lines[name].get_marker() not in (None, "None", ""), name
        assert x0 <= min(xs) and max(xs) < x1 and y0 < min(ys) and max(ys) < y1, (name, xs, ys, x1, y0, y1)


# -- tiles of a painted image ------------------------------------------------------------------------
def test_painted_image_is_cut_into_tiles_that_are_their_own_groups(consep):
    from napari_medseg.io import read_image

    assert tile_bounds(600, 256) == [(0, 300), (300, 600)]
    assert tile_bounds(100, 256) == [(0, 100)]
    image = read_image(consep / "images" / "train_1_005.png")
    labels = tifffile.imread(consep / "labels" / "train_1_005.tif").astype(np.uint8)
    items, regions = layer_items(image, True, labels, 5, 3, 128, "H&E")
    assert len(items) == 4 and len({it.group for it in items}) == 4
    assert all(it.image.shape == (128, 128, 3) and it.image.dtype == np.float32 for it in items)
    p, y0, y1, x0, x1 = regions[items[3].name]
    np.testing.assert_array_equal(items[3].labels, labels[y0:y1, x0:x1])
    # a stack (as the reader opens a dataset folder): tiles of every plane
    stack_items, stack_regions = layer_items(np.stack([image, image]), True, np.stack([labels, labels]), 5, 3, 256, "s")
    assert len(stack_items) == 2 and stack_regions[stack_items[1].name][0] == 1
    with pytest.raises(TileInputError, match="class id"):
        layer_items(image, True, labels, 3, 3, 128, "H&E")  # CoNSeP labels go up to 4
    with pytest.raises(TileInputError, match="shape"):
        layer_items(image, True, labels[:100], 5, 3, 128, "H&E")


# -- training from a dataset folder, in the caller's thread --------------------------------------------
def test_train_from_folder_writes_model_plots_previews_and_lists_it_in_segment(make_napari_viewer, small_consep,
                                                                                tmp_path):
    viewer = make_napari_viewer()
    mine = viewer.add_image(np.zeros((300, 200, 3), np.uint8), name="my image")  # open while the folder trains
    segment = SegmentWidget(viewer)  # opened before training: its model list must update
    widget = TrainWidget(viewer)
    _tiny(widget, tmp_path / "models")
    widget.source.value = FROM_FOLDER
    widget.dataset.value = str(small_consep)
    widget.val_fraction.value = 0.34  # 1 of the 3 source images
    widget.distance_head.value = True  # learnt from the folder's instances/
    (tmp_path / "models" / "tiny").mkdir(parents=True)  # an earlier run's folder is never written into
    seen = []
    widget.update_received.connect(seen.append)

    done = widget.run(threaded=False)

    assert isinstance(done, TrainingDone) and not done.stopped_early and done.best_epoch in (1, 2)
    assert done.checkpoint == tmp_path / "models" / "tiny-2" / "best.safetensors" and done.checkpoint.is_file()
    meta = read_meta(done.checkpoint)
    assert meta.classes == CONSEP_CLASSES and meta.model.encoder == "resnet18" and meta.model.distance_head
    assert meta.data["val_images"] == 2 and meta.data["train_images"] == 4
    assert meta.data["datasets"] == [str(small_consep)]
    # what trained and what validated, said from the start and still there at the end
    assert widget.split_note.value.startswith("training on 4 images of 2 source images; validating on 2 images "
                                              "of 1 (train_"), widget.split_note.value
    # the plot got a point per epoch for training and validation loss and the metrics
    data = widget.plot.data
    assert data["train_loss"][0] == [1.0, 2.0] and data["val_loss"][0] == [1.0, 2.0]
    assert len(data["miou"][1]) == 2 and all(0.0 <= v <= 1.0 for v in data["mean_dice"][1])
    assert len(data["bpq"][1]) == 2 and all(0.0 <= v <= 1.0 for v in data["bpq"][1])  # nuclei of the head
    assert len(data["batch_loss"][0]) == len([u for u in seen if isinstance(u, BatchDone)]) >= 2
    widget.plot.join()
    assert list(widget.plot.lines["train_loss"].get_xdata()) == [1.0, 2.0]
    assert widget.progress.value == widget.progress.max
    # the validation prediction: the sample and the best checkpoint's class map over it
    image_layer, labels_layer = _preview_layers(viewer)
    assert image_layer.data.shape == (256, 256, 3) and labels_layer.data.shape == (256, 256)
    assert labels_layer.metadata["medseg"]["classes"] == CONSEP_CLASSES
    # beside the user's image, not over it (it had been put at the origin, covering it); the labels on the sample
    assert image_layer.extent.world[0][1] > mine.extent.world[1][1]
    np.testing.assert_allclose(labels_layer.extent.world, image_layer.extent.world)
    # listed in the Segment widget, and segmenting with it works
    assert widget.trained_name == "trained: tiny-2"
    assert widget.trained_name in segment.model_source.choices
    assert widget.trained_name in widget.start_from.choices  # and fine-tunable further
    segment.image_layer.value = image_layer
    segment.model_source.value = widget.trained_name
    segment.tile_size.value, segment.overlap.value = 128, 32
    layer = segment.run(threaded=False)
    assert layer is not None and layer.data.shape == (256, 256), segment.status.value
    assert segment.last_instances_layer is not None and segment.last_instances_layer.data.shape == (256, 256)
    assert "Done" in widget.status.value and widget.train_button.enabled and not widget.stop_button.enabled


# -- fine-tuning on painted layers, threaded, stopped mid-run ----------------------------------------------
def test_threaded_fine_tune_on_layers_stops_after_a_batch_and_keeps_best(make_napari_viewer, qtbot, consep,
                                                                         tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    image, labels = _painted(viewer, consep)
    widget = TrainWidget(viewer)
    widget.source.value = FROM_LAYERS
    assert widget.start_from.value == DEFAULT_MODEL  # painted corrections fine-tune the current model
    widget.start_from.value = FILE_MODEL
    widget.checkpoint.value = tiny_checkpoint
    widget.image_layer.value, widget.labels_layer.value = image, labels
    widget.tile_size.value = 128  # 4 tiles: 3 to train, 1 to validate
    widget.val_fraction.value = 0.25
    widget.crops_per_image.value = 4
    widget.freeze_encoder.value = True
    _fast(widget, tmp_path / "models", epochs=10, name="finetuned")

    def stop_in_epoch_two(update):
        if isinstance(update, BatchDone) and update.epoch == 2:
            widget.stop()

    widget.update_received.connect(stop_in_epoch_two)
    worker = widget.run()
    assert worker is not None and not widget.train_button.enabled and widget.stop_button.enabled
    qtbot.waitUntil(lambda: widget.result is not None or widget.error is not None, timeout=60_000)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)

    done = widget.result
    assert widget.error is None and done is not None
    assert done.stopped_early and done.reason == "stopped by user" and len(done.history) < 10
    assert done.checkpoint.is_file() and done.best_epoch >= 1  # the best checkpoint is kept
    model, meta = load_checkpoint(done.checkpoint)
    assert meta.classes == CONSEP_CLASSES and meta.training["config"]["init_checkpoint"] == str(tiny_checkpoint)
    assert meta.data["train_images"] == 3 and meta.data["val_images"] == 1
    assert meta.training["config"]["freeze_encoder"] is True
    assert len(widget.plot.data["batch_loss"][0]) >= 4 and len(widget.plot.data["val_loss"][0]) >= 1
    _assert_plot_shows_every_point(widget.plot)  # one finished epoch: its points are drawn
    assert "stopped by user" in widget.status.value and widget.train_button.enabled
    # the validation tile's prediction sits on the painted image (its layer goes in over a few turns)
    qtbot.waitUntil(lambda: len(_preview_layers(viewer)) == 1 and not widget._going_in, timeout=5_000)
    (preview,) = _preview_layers(viewer)
    assert preview.data.shape == labels.data.shape and preview.data.any()
    assert widget.trained_name in trained_models.names()


# -- Stop before the first epoch ends: nothing is kept, and the status says why -------------------------------
def test_stop_after_first_batch_keeps_nothing_and_says_why(make_napari_viewer, consep, tmp_path):
    viewer = make_napari_viewer()
    image, labels = _painted(viewer, consep)
    widget = TrainWidget(viewer)
    widget.source.value = FROM_LAYERS
    _tiny(widget, tmp_path / "models", epochs=3)
    widget.tile_size.value = 128
    widget.crops_per_image.value = 4
    batches = []

    def stop_at_once(update):
        if isinstance(update, BatchDone):
            batches.append(update)
            widget.stop()

    widget.update_received.connect(stop_at_once)
    before = set(trained_models.names())
    done = widget.run(threaded=False)
    assert len(batches) == 1  # ended after the current batch
    assert done.stopped_early and done.reason == "stopped by user" and done.checkpoint is None
    assert "no model was saved" in widget.status.value
    assert not (tmp_path / "models" / "tiny").exists()  # the empty run folder is removed
    assert set(trained_models.names()) == before and not _preview_layers(viewer)
    assert widget.train_button.enabled and not widget.stop_button.enabled


# -- Stop while an epoch's validation images are scored: the run ends there, the last scored epoch kept -------
def test_stop_during_validation_ends_the_run_there_and_keeps_the_epoch_before(make_napari_viewer, consep,
                                                                              tmp_path):
    viewer = make_napari_viewer()
    image, labels = _painted(viewer, consep)
    widget = TrainWidget(viewer)
    widget.source.value = FROM_LAYERS
    _tiny(widget, tmp_path / "models", epochs=4)
    widget.tile_size.value = 128  # 4 tiles: 3 to train, 1 to validate
    widget.val_fraction.value = 0.25
    widget.crops_per_image.value = 4
    epochs_said, said_on_stop = [], []

    def on_update(update):
        if isinstance(update, BatchDone) and update.epoch == 2 and update.step == update.steps:
            widget.stop()  # pressed after epoch 2's last batch: its validation comes next
            said_on_stop.append(widget.status.value)
        if isinstance(update, EpochDone):
            epochs_said.append(update.epoch)

    widget.update_received.connect(on_update)
    done = widget.run(threaded=False)
    assert done.stopped_early and done.reason == "stopped by user"
    assert epochs_said == [1] and [r["epoch"] for r in done.history] == [1]  # epoch 2 was not scored
    # what Stop said while the run went on: the epoch under way (here: its validation) is not kept
    assert said_on_stop == [STOPPING] and "epoch under way is not kept" in STOPPING
    assert done.best_epoch == 1 and done.checkpoint.is_file()
    assert "stopped by user" in widget.status.value and "best epoch 1" in widget.status.value
    assert widget.train_button.enabled and not widget.stop_button.enabled


# -- bad input: a clear message, the viewer as it was, nothing made ------------------------------------------
BAD_INPUTS = {  # case -> what the message must say
    "no image": "Choose an image layer", "no labels": "Choose a Labels layer", "labels shape": "shape",
    "labels beyond classes": "class id 9", "empty labels": "empty", "empty folder": "not a dataset folder",
    "no images": "holds no images", "classes differ": "was trained for classes", "unwritable output": "Cannot write",
    "crop size": "multiple of 8",
}


def _set_up_bad_input(bad, viewer, widget, consep, tmp_path):
    """Make the widget's inputs wrong in one way; returns the output folder that must not appear."""
    tmp_path.mkdir(parents=True)
    out = tmp_path / "models"
    if bad not in ("no image", "no labels"):
        image, labels = _painted(viewer, consep)
    if bad == "no labels":
        viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="H&E", rgb=True)
    elif bad == "labels shape":
        viewer.layers.remove(labels)
        widget.labels_layer.value = viewer.add_labels(np.ones((128, 128), np.uint8))
    elif bad == "labels beyond classes":
        labels.data[:5, :5] = 9
    elif bad == "empty labels":
        labels.data = np.zeros_like(labels.data)
    elif bad in ("empty folder", "no images", "classes differ"):
        folder = tmp_path / "data"
        (folder / "images").mkdir(parents=True) if bad != "empty folder" else folder.mkdir()
        (folder / "classes.json").write_text('{"classes": %s}' % str(CONSEP_CLASSES).replace("'", '"'))
        widget.source.value = FROM_FOLDER
        widget.dataset.value = str(folder)
        if bad == "classes differ":
            tifffile.imwrite(folder / "images" / "a.tif", np.zeros((64, 64, 3), np.uint8))
            (folder / "labels").mkdir()
            tifffile.imwrite(folder / "labels" / "a.tif", np.zeros((64, 64), np.uint8))
            # other classes than the model's (a nucleus-only folder fine-tunes the model's nuclei instead)
            (folder / "classes.json").write_text('{"classes": ["background", "tumour", "stroma"]}')
    elif bad == "unwritable output":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        out = blocker / "models"
        widget.output_dir.value = str(out)
    elif bad == "crop size":
        widget.crop_size.value = 36  # the tiny model needs multiples of 8
    return out


def test_bad_input_reports_clearly_and_makes_nothing(make_napari_viewer, consep, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()  # one viewer for every case: a fresh widget and fresh layers each time
    for bad, expected in BAD_INPUTS.items():
        viewer.layers.clear()
        widget = TrainWidget(viewer)
        _tiny(widget, tmp_path / bad / "models")
        widget.source.value = FROM_LAYERS
        widget.start_from.value = FILE_MODEL
        widget.checkpoint.value = tiny_checkpoint
        out = _set_up_bad_input(bad, viewer, widget, consep, tmp_path / bad)
        layers_before = [(l.name, l.data.shape) for l in viewer.layers]

        assert widget.run(threaded=False) is None, bad
        assert widget.error and expected in widget.error, (bad, widget.error)
        assert widget.status.value.startswith("Error:"), bad
        assert [(l.name, l.data.shape) for l in viewer.layers] == layers_before, bad
        assert not out.exists() and widget.result is None, bad
        assert widget.train_button.enabled and not widget.stop_button.enabled, bad


def test_loss_plot_is_drawn_off_the_gui_thread_at_the_views_size(qtbot):
    """matplotlib's text layout cost the GUI thread 0.1-0.5 s a redraw: the figure is drawn on
    the plot's thread and the view only paints the picture, at the size it was given."""
    import threading

    from napari_medseg._napari.loss_plot import LossPlot

    plot = LossPlot("dark")
    qtbot.addWidget(plot.canvas)
    plot.canvas.resize(420, 300)
    drawn_on = []
    render = plot._render
    plot._render = lambda *a: (drawn_on.append(threading.current_thread()), render(*a))[1]
    for epoch, loss in ((1, 0.9), (2, 0.6), (3, 0.5)):
        plot.add("train_loss", epoch, loss)
        plot.add("val_loss", epoch, loss + 0.1)
        plot.add("miou", epoch, 0.2 * epoch)
    plot.mark_best(3)
    plot.draw()
    plot.join()
    qtbot.waitUntil(lambda: plot.canvas._image is not None and plot.canvas._image.width() == 420 * plot.canvas.devicePixelRatioF())
    assert drawn_on and all(t is not threading.main_thread() for t in drawn_on)
    assert plot.canvas._image.height() == round(300 * plot.canvas.devicePixelRatioF())
    assert list(plot.lines["val_loss"].get_ydata()) == [1.0, 0.7, 0.6]
    assert list(plot.best_marker.get_xdata()) == [3.0, 3.0]
    # the picture is not blank: the lines and the axes are drawn in it
    image = plot.canvas._image
    assert len({image.pixel(x, y) for x in range(0, image.width(), 5) for y in range(0, image.height(), 5)}) > 20
    # a new run's empty axes are drawn once per size, then shown as they were
    plot.clear()
    plot.join()
    drawings = len(drawn_on)
    plot.clear()
    plot.join()
    assert len(drawn_on) == drawings and plot.canvas._image is plot._blank.image


def test_preview_lands_on_painted_layers_in_microns_moved_by_an_affine(make_napari_viewer, consep, tmp_path):
    """Painted layers in µm, moved with napari's Transform tool (an affine): the preview takes the
    labels layer's scale, translate, units and affine, so it covers them (not the canvas origin)
    and napari keeps one unit across the layers."""
    viewer = make_napari_viewer()
    image, labels = _painted(viewer, consep)
    shift = np.array([[1.0, 0, 0], [0, 1, 300], [0, 0, 1]])
    for layer in (image, labels):
        layer.scale, layer.translate, layer.units = (0.25, 0.25), (4.0, 8.0), ("um", "um")
        layer.affine = shift
    widget = TrainWidget(viewer)
    widget.source.value = FROM_LAYERS
    _tiny(widget, tmp_path / "models", epochs=1)
    widget.image_layer.value, widget.labels_layer.value = image, labels
    widget.tile_size.value = 256  # one tile: its own preview
    widget.crops_per_image.value = 2
    assert widget.run(threaded=False) is not None and widget.error is None
    (preview,) = _preview_layers(viewer)
    assert tuple(preview.scale) == (0.25, 0.25) and tuple(preview.translate) == (4.0, 8.0)
    assert tuple(str(u) for u in preview.units) == ("micrometer", "micrometer")
    np.testing.assert_allclose(preview.affine.affine_matrix, shift)
    np.testing.assert_allclose(preview.extent.world, labels.extent.world)
    assert viewer.layers.extent.units is not None  # one unit: no 'Inconsistent units' warning


def test_fine_tunes_on_a_corrected_region_result_with_its_whole_image(make_napari_viewer, tiny_checkpoint, tmp_path):
    """Segment a drawn rectangle, correct it, fine-tune on it with the image it was drawn on: the
    tiles are the rectangle's pixels of the image (it had been refused: 'shape (141, 141) but the
    pixels of 'CoNSeP H&E' are (256, 256)'), and the preview lands on the region. An image placed
    elsewhere is still refused."""
    from napari_medseg._napari.train_form import plan_training
    from napari_medseg.io.images import to_rgb_float

    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "consep")
    image = viewer.layers["CoNSeP H&E"]
    _, seg = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    seg.device.value = "cpu"
    # drawn in µm, the sample's units (0.25 µm/px): pixels (40, 60) to (180, 200)
    shapes = viewer.add_shapes([np.array([[40, 60], [40, 200], [180, 200], [180, 60]]) * 0.25], shape_type="rectangle")
    seg.target.value, seg.shapes_layer.value = "drawn shape", shapes
    region = seg.run(threaded=False)
    assert region.data.shape == (140, 140) and tuple(region.translate) == (10, 15)  # (40, 60) px in µm
    region.data_setitem((np.arange(20), np.arange(20)), 3)  # a correction
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    widget.source.value = FROM_LAYERS
    widget.start_from.value = FILE_MODEL
    widget.checkpoint.value = tiny_checkpoint
    widget.image_layer.value, widget.labels_layer.value = image, region
    widget.tile_size.value = 256  # one tile: the whole region
    widget.crops_per_image.value = 2
    _fast(widget, tmp_path / "models", epochs=1, name="region")
    (tile,), classes = plan_training(widget.form()).items
    np.testing.assert_array_equal(tile.image, to_rgb_float(image.data[40:180, 60:200], 3))
    np.testing.assert_array_equal(tile.labels, region.data)
    done = widget.run(threaded=False)
    assert done is not None and done.checkpoint is not None, widget.status.value
    (preview,) = _preview_layers(viewer)
    assert preview.data.shape == (140, 140)
    np.testing.assert_allclose(preview.extent.world, region.extent.world)
    image.translate = (5, 5)  # no longer under the region
    assert widget.run(threaded=False) is None and "choose a Labels layer painted on this image" in widget.status.value


def test_a_nucleus_only_folder_fine_tunes_a_classed_model_from_the_widget(make_napari_viewer, tiny_checkpoint,
                                                                         tmp_path):
    """A lab's nucleus masks (TNBC's kind) and a 5-class model, through Plugins > Train: it had
    been refused ('start from a new model'); it trains the model's nuclei and keeps its classes."""
    from conftest import copy_small_tnbc

    folder = copy_small_tnbc(tmp_path / "lab")
    widget = _fine_tune_form(make_napari_viewer(), tiny_checkpoint, folder, tmp_path / "models", "lab")
    done = widget.run(threaded=False)
    assert isinstance(done, TrainingDone), widget.status.value
    meta = read_meta(done.checkpoint)
    assert meta.classes == CONSEP_CLASSES  # the model's classes, not the folder's two
    assert not (done.checkpoint.parent / "resume.safetensors").exists()  # the widget never resumes: no 80 MB file
    assert "lab: training on 2 images" in widget.split_note.value, widget.split_note.value


def test_a_folder_of_one_source_image_names_the_widgets_own_control(make_napari_viewer, consep, tmp_path):
    """The core's refusal said 'set data.val_fraction: 0', a key the widget user never sees."""
    import shutil

    folder = tmp_path / "one_source"
    for sub, ext in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
        (folder / sub).mkdir(parents=True)
        for stem in ("train_1_005", "train_1_006"):
            shutil.copy(consep / sub / f"{stem}{ext}", folder / sub / f"{stem}{ext}")
    shutil.copy(consep / "classes.json", folder / "classes.json")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    _tiny(widget, tmp_path / "models", epochs=1, name="one")
    widget.source.value = FROM_FOLDER
    widget.dataset.value = str(folder)
    widget.run(threaded=False)
    assert widget.result is None
    assert "all 2 images come from one source image" in widget.status.value, widget.status.value
    assert "set 'validation' to 0 (under 'advanced settings')" in widget.status.value
    assert "data.val_fraction" not in widget.status.value


def test_a_fine_tune_kept_by_least_loss_against_its_start_says_the_starts_figures(make_napari_viewer,
                                                                                   tiny_checkpoint, small_consep,
                                                                                   tmp_path):
    """Plugins > Train, best by 'least loss vs the start model': the start is scored before the first
    epoch and its figures stand under the split; the model records them."""
    from napari_medseg._napari.train_form import SMALLEST_LOSS

    widget = _fine_tune_form(make_napari_viewer(), tiny_checkpoint, small_consep, tmp_path / "models", "least")
    widget.monitor.value = SMALLEST_LOSS
    done = widget.run(threaded=False)
    assert isinstance(done, TrainingDone), widget.status.value
    note = widget.split_note.value
    assert note.startswith("training on 4 images") and "\nThe start model on the validation images" in note, note
    scores = read_meta(done.checkpoint).training["start_scores"]
    assert f"bPQ {scores['bpq']:.4f}" in note and "Scoring" not in note
    assert "least_gain_over_start" in done.history[0]
