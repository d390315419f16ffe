"""The Train widget's run in a process of its own (``training.process``), driven as the widget's
worker drives it (``TrainingJob.updates``): the same updates, previews and checkpoint as a run in
this process, a stop that ends it after its batch, and failures as the widget shows them."""

from __future__ import annotations

import numpy as np

from napari_medseg._napari.training_job import Preview, TrainingFailed, TrainingJob, TrainingProcessError
from napari_medseg.models import load_checkpoint
from napari_medseg.training import BatchDone, EpochDone, TrainingDone
from test_training import tiny_config


def test_a_folder_run_in_its_process_sends_every_update_a_preview_and_the_checkpoint(small_consep, tmp_path):
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=2", "data.val_fraction=0.34")
    updates = list(TrainingJob(cfg).updates())
    kinds = [type(u) for u in updates]
    assert kinds.count(EpochDone) == 2 and BatchDone in kinds and isinstance(updates[-1], TrainingDone)
    done = updates[-1]
    assert done.checkpoint.is_file() and done.best_epoch in (1, 2) and len(done.history) == 2
    assert load_checkpoint(done.checkpoint)[1].data["val_images"] == 2  # split by source image, as here
    previews = [u for u in updates if isinstance(u, Preview)]
    assert previews and previews[0].image is not None  # folder data: the sample comes with it
    assert previews[0].labels.shape == previews[0].image.shape[:2] and previews[0].labels.dtype == np.uint8
    assert previews[0].classes == ["background", "other", "inflammatory", "epithelial", "spindle"]
    epochs = [u for u in updates if isinstance(u, EpochDone)]
    assert all(np.isfinite(e.train_loss) for e in epochs) and 0.0 <= epochs[-1].metrics["nucleus_dice"] <= 1.0


def test_stop_ends_the_process_run_after_its_batch_and_keeps_the_best(small_consep, tmp_path):
    job = TrainingJob(tiny_config(small_consep, tmp_path / "run", "epochs=20", "data.val_fraction=0.34"),
                      preview=False)
    updates = []
    for update in job.updates():
        updates.append(update)
        if isinstance(update, EpochDone):
            job.stop()
    done = updates[-1]
    assert isinstance(done, TrainingDone) and done.stopped_early and done.reason == "stopped by user"
    assert len(done.history) < 20 and done.checkpoint.is_file()


def test_a_bad_setting_and_a_bug_come_back_as_the_widget_shows_them(small_consep, tmp_path, monkeypatch):
    bad = tiny_config(small_consep, tmp_path / "run", "epochs=1")
    bad.data.dataset = [str(tmp_path / "no-such-folder")]
    (failed,) = list(TrainingJob(bad, preview=False).updates())
    assert isinstance(failed, TrainingFailed) and failed.error is None and "no-such-folder" in failed.message
    cfg = tiny_config(small_consep, tmp_path / "run2", "epochs=1")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child imports this first: a bug in the trainer
    (tmp_path / "sitecustomize.py").write_text(
        "import napari_medseg.training.trainer as t\n"
        "def broken(*a, **k):\n    raise ZeroDivisionError('a bug in the trainer')\n"
        "t.train = broken\n")
    (failed,) = list(TrainingJob(cfg, preview=False).updates())
    assert isinstance(failed, TrainingFailed) and isinstance(failed.error, TrainingProcessError)
    assert "a bug in the trainer" in failed.message and "ZeroDivisionError" in str(failed.error)
