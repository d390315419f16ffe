"""The Train widget's form -> config step without Qt or a viewer, and how failures reach the user."""

from __future__ import annotations

import traceback
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image
from napari_medseg.training.config import DataConfig, TrainConfig
from napari_medseg._napari.train_form import (FILE_MODEL, FROM_LAYERS, NEW_MODEL, MONITORS, NO_AUGMENTATION,
                                              PaintedLayers, TrainForm, plan_training)
from napari_medseg._napari.training_job import TrainingFailed, failure, make_run_dir

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def test_form_defaults_are_the_core_defaults():
    form, train, data = TrainForm(), TrainConfig(), DataConfig()
    assert (form.batch_size, form.lr, form.loss) == (train.batch_size, train.lr, train.loss)
    assert (form.patience, form.freeze_encoder) == (train.patience, train.freeze_encoder)
    assert (form.crop_size, form.crops_per_image, form.val_fraction) == (data.crop_size, data.crops_per_image,
                                                                          data.val_fraction)
    assert MONITORS[form.monitor] == train.monitor and form.device == train.device


def test_folder_form_becomes_a_config(small_consep):
    form = TrainForm(dataset=str(small_consep), start_from=NEW_MODEL, encoder="resnet18", encoder_depth=3,
                     epochs=3, lr=0.01, batch_size=2, crop_size=64, augment=False, distance_head=True,
                     monitor="validation mIoU", model_name="tiny")
    plan = plan_training(form)
    cfg = plan.cfg
    assert plan.items is None and plan.layer_source is None
    assert cfg.data.dataset == [str(small_consep)] and cfg.data.crop_size == 64
    assert cfg.model.num_classes == 5 and cfg.model.encoder == "resnet18" and cfg.model.distance_head
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.monitor) == (3, 0.01, 2, "val_miou")
    assert cfg.augment == NO_AUGMENTATION and cfg.init_checkpoint is None


def test_painted_form_becomes_tiles_and_a_fine_tuning_config(consep, tiny_checkpoint):
    image = read_image(consep / "images" / "train_1_005.png")
    labels = tifffile.imread(consep / "labels" / "train_1_005.tif").astype(np.uint8)
    layers = PaintedLayers(image, labels, rgb=True, name="H&E", classes=CONSEP_CLASSES,
                           placement={"scale": (2.0, 2.0), "translate": (0.0, 0.0)})
    form = TrainForm(source=FROM_LAYERS, layers=layers, tile_size=128, start_from=FILE_MODEL,
                     checkpoint=str(tiny_checkpoint), crop_size=64)
    plan = plan_training(form)
    items, classes = plan.items
    assert len(items) == 4 and classes == CONSEP_CLASSES and plan.cfg.data.dataset == []
    assert plan.cfg.init_checkpoint == str(tiny_checkpoint) and plan.cfg.model.encoder == "resnet18"
    assert plan.layer_source.placement["scale"] == (2.0, 2.0) and len(plan.layer_source.regions) == 4
    # a single tile: nothing to hold out
    assert plan_training(replace(form, tile_size=256)).cfg.data.val_fraction == 0.0


@pytest.mark.parametrize("change, expected", [
    ({"model_name": "../x"}, "plain name"),
    ({"source": FROM_LAYERS}, "Choose an image layer"),
    ({"start_from": FILE_MODEL, "checkpoint": "/nope.safetensors"}, "existing .safetensors"),
    ({"crop_size": 36, "encoder": "resnet18", "encoder_depth": 3}, "multiple of 8"),
    ({"dataset": "/nonexistent-folder"}, "not a dataset folder"),
    # an empty folder box reads '.': it had been taken as the folder napari was started in
    ({"dataset": "."}, "Choose a dataset folder"),
    ({"dataset": ""}, "Choose a dataset folder"),
    ({"output_dir": "."}, "Choose a folder to save the model in"),
])
def test_bad_forms_raise_a_message_for_the_user(small_consep, change, expected):
    form = TrainForm(**{"dataset": str(small_consep), "start_from": NEW_MODEL, **change})
    with pytest.raises(MedsegError, match=expected):
        plan_training(form)


def test_run_folder_is_new_and_unwritable_places_are_refused(tmp_path):
    (tmp_path / "model").mkdir()
    run_dir, created = make_run_dir(tmp_path, "model")
    assert run_dir == tmp_path / "model-2" and run_dir.is_dir() and created == run_dir
    (tmp_path / "a-file").write_text("")
    with pytest.raises(MedsegError, match="Cannot write"):
        make_run_dir(tmp_path / "a-file" / "models", "model")


def test_a_bug_in_training_keeps_its_traceback_and_a_user_error_its_message():
    from napari_medseg.training.config import TrainConfigError

    assert failure(TrainConfigError("epochs must be positive")) == TrainingFailed("epochs must be positive")

    def broken():
        tensor_like = np.zeros(10)  # noqa: F841 - a local the traceback must not keep alive
        raise KeyError("oops")

    try:
        broken()
    except KeyError as exc:
        failed = failure(exc)
    assert failed.error is not None and failed.error.__traceback__ is not None
    assert all(not frame.f_locals for frame, _ in traceback.walk_tb(failed.error.__traceback__.tb_next))


def test_widgets_show_a_user_error_and_hand_a_bug_to_napari_with_its_traceback(monkeypatch):
    from napari.utils import notifications

    from napari_medseg._napari.common import WidgetInputError, report_error

    shown, received = [], []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    monkeypatch.setattr(notifications.notification_manager, "receive_error",
                        lambda kind, exc, tb: received.append((kind, exc, tb)))
    status = SimpleNamespace(value="")  # a status line
    assert report_error(status, WidgetInputError("Choose an image layer.")) == "Choose an image layer."
    assert status.value == "Error: Choose an image layer." and shown == ["Choose an image layer."] and not received
    try:
        {}["missing"]
    except KeyError as exc:
        bug = exc
    report_error(status, bug, prefix="Training failed: ")
    assert received == [(KeyError, bug, bug.__traceback__)] and len(shown) == 1
    assert status.value.startswith("Error: Training failed: KeyError") and "traceback" in status.value


def test_a_regions_labels_train_on_the_images_pixels_at_its_origin(consep, tiny_checkpoint):
    """Labels of a region (their ``origin`` in the image, as the widget finds it) take the image's
    pixels there; an origin that does not fit, or none, is refused with the shapes."""
    from napari_medseg.io.images import to_rgb_float

    image = read_image(consep / "images" / "train_1_005.png")
    labels = tifffile.imread(consep / "labels" / "train_1_005.tif").astype(np.uint8)[40:181, 60:201]
    layers = PaintedLayers(image, labels, rgb=True, name="H&E", classes=CONSEP_CLASSES, origin=(40, 60))
    form = TrainForm(source=FROM_LAYERS, layers=layers, tile_size=256, start_from=FILE_MODEL,
                     checkpoint=str(tiny_checkpoint), crop_size=64)
    (tile,), _ = plan_training(form).items
    np.testing.assert_array_equal(tile.image, to_rgb_float(image[40:181, 60:201], 3))
    for origin in (None, (200, 60)):
        with pytest.raises(MedsegError, match=r"shape \(141, 141\).*\(256, 256\)"):
            plan_training(replace(form, layers=replace(layers, origin=origin)))


def test_an_instance_map_chosen_as_labels_is_named_as_one(consep, tiny_checkpoint):
    """CoNSeP's instance map (ids up to 104) chosen as the labels to fine-tune the 5-class model on:
    the message had asked to repaint 'class id 104' with one of the classes."""
    image = read_image(consep / "images" / "train_19_005.png")
    instances = tifffile.imread(consep / "instances" / "train_19_005.tif").astype(np.int32)
    layers = PaintedLayers(image, instances, rgb=True, name="my nuclei", classes=None,
                           placement={"scale": (1.0, 1.0), "translate": (0.0, 0.0)})
    form = TrainForm(source=FROM_LAYERS, layers=layers, start_from=FILE_MODEL, checkpoint=str(tiny_checkpoint))
    with pytest.raises(MedsegError) as caught:
        plan_training(form)
    message = str(caught.value)
    assert f"holds {len(np.unique(instances)) - 1} ids up to {instances.max()}" in message
    assert "looks like an instance map" in message and "not one per nucleus" in message
    assert "paint those pixels" not in message


def test_a_nucleus_only_folder_fine_tunes_a_classed_models_nuclei(tiny_checkpoint, tmp_path):
    """TNBC-like masks (background, nucleus) and the 5-class model to fine-tune: refused before,
    with advice to start from a new model (the default thrown away). Now the folder trains the
    model's nuclei, not its classes (the CLI's `labels: binary`), and the model keeps its classes;
    the trainer reads it so."""
    from conftest import copy_small_tnbc
    from napari_medseg.training.mixed import BINARY_NUCLEUS
    from napari_medseg.training.setup import load_start_checkpoint, prepare_data

    folder = copy_small_tnbc(tmp_path / "lab")
    form = TrainForm(dataset=str(folder), start_from=FILE_MODEL, checkpoint=str(tiny_checkpoint), crop_size=64,
                     model_name="lab")
    cfg = plan_training(form).cfg
    assert cfg.data.dataset == [] and [(s.path, s.labels) for s in cfg.data.datasets] == [(str(folder), "binary")]
    data = prepare_data(cfg, None, load_start_checkpoint(cfg))
    assert data.classes == CONSEP_CLASSES and data.has_binary_sets and cfg.model.num_classes == 5
    assert any((it.labels == BINARY_NUCLEUS).any() for it in data.train_items)
    # a folder of other classes than the model's (more than nucleus-only) is still refused
    with pytest.raises(MedsegError, match="start from a new model or a model with these classes"):
        (folder / "classes.json").write_text('{"classes": ["background", "a", "b"]}')
        plan_training(form)


def test_best_by_least_loss_against_the_start_needs_a_start_model(small_consep, tiny_checkpoint):
    from napari_medseg._napari.train_form import SMALLEST_LOSS
    from napari_medseg._napari.common import WidgetInputError

    form = TrainForm(dataset=str(small_consep), start_from=NEW_MODEL, encoder="resnet18", encoder_depth=3,
                     crop_size=64, monitor=SMALLEST_LOSS)
    with pytest.raises(WidgetInputError, match="choose a model to start from"):
        plan_training(form)
    tuned = plan_training(replace(form, start_from=FILE_MODEL, checkpoint=str(tiny_checkpoint)))
    assert tuned.cfg.monitor == "val_least_gain_over_start" and tuned.cfg.init_checkpoint == str(tiny_checkpoint)
