"""Trained models outlive the session: the models folder lists them in Segment; fine-tuning keeps
the start model's tuned foreground threshold."""

from __future__ import annotations

import shutil

import pytest

from napari_medseg._napari import model_list
from napari_medseg.training.process import keep_threshold
from napari_medseg.models.checkpoint import read_meta


def test_fine_tuned_checkpoint_keeps_the_start_threshold(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "best.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    assert read_meta(checkpoint).foreground_threshold is None
    keep_threshold(checkpoint, 0.43)
    assert read_meta(checkpoint).foreground_threshold == pytest.approx(0.43)
    keep_threshold(checkpoint, 0.7)  # a threshold of its own is never replaced
    assert read_meta(checkpoint).foreground_threshold == pytest.approx(0.43)


def test_models_folder_lists_earlier_sessions_models_in_segment(make_napari_viewer, tiny_checkpoint, tmp_path,
                                                                monkeypatch):
    run = tmp_path / "my-lab-model"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "best.safetensors")
    monkeypatch.setattr(model_list, "MODELS_DIR", tmp_path)
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.model_source.reset_choices()
    # the name it had in the session that trained it (the Train widget's 'Choose trained: ...')
    assert "trained: my-lab-model" in segment.model_source.choices
    segment.model_source.value = "trained: my-lab-model"
    assert segment._model_ref() == str(run / "best.safetensors")


def test_a_model_trained_now_is_listed_before_the_file_choice_and_keeps_its_name(make_napari_viewer, tiny_checkpoint,
                                                                                 tmp_path, monkeypatch):
    """Segment had listed 'default (shipped)', 'saved: tiny', 'checkpoint file...', 'trained: ft'; the
    same model was 'trained: tiny' in the session that made it and 'saved: tiny' in the next."""
    models = tmp_path / "models"
    for name in ("tiny", "ft"):
        (models / name).mkdir(parents=True)
    shutil.copy(tiny_checkpoint, models / "tiny" / "best.safetensors")
    monkeypatch.setattr(model_list, "MODELS_DIR", models)
    monkeypatch.setattr(model_list, "trained_models", model_list.TrainedModels())
    from napari_medseg._napari import segment_widget

    monkeypatch.setattr(segment_widget, "trained_models", model_list.trained_models)
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.model_source.reset_choices()
    assert segment.model_source.choices == ("default (shipped)", "trained: tiny", "checkpoint file...")
    segment.model_source.value = "trained: tiny"
    shutil.copy(tiny_checkpoint, models / "ft" / "best.safetensors")  # a run finishing in this session
    assert model_list.trained_models.add(models / "ft" / "best.safetensors", "ft") == "trained: ft"
    native = segment.model_source.native
    assert [native.itemText(i) for i in range(native.count())] == [
        "default (shipped)", "trained: ft", "trained: tiny", "checkpoint file..."]
    assert segment.model_source.value == "trained: tiny"  # the user's choice stays
    # a run of another folder, named as one in the models folder, gets a name of its own
    other = tmp_path / "elsewhere" / "tiny"
    other.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, other / "best.safetensors")
    assert model_list.trained_models.add(other / "best.safetensors", "tiny") == "trained: tiny (2)"
