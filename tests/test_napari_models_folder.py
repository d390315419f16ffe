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
    assert "saved: my-lab-model" in segment.model_source.choices
    segment.model_source.value = "saved: my-lab-model"
    assert segment._model_ref() == str(run / "best.safetensors")
