"""The Train widget's runs keep what they saved: a run that fails, or whose viewer closes, after
a best epoch keeps that checkpoint (and lists it); one that saved nothing leaves nothing behind,
also when Python exits right after it. Real CoNSeP patches, tiny models, CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from napari_medseg._napari.model_list import trained_models
from napari_medseg._napari.train_form import FROM_FOLDER, NEW_MODEL, TrainForm, plan_training
from napari_medseg._napari.training_job import TrainingJob, make_run_dir
from napari_medseg._napari.train_widget import TrainWidget
from napari_medseg.models import load_checkpoint
from napari_medseg.training.events import EpochDone, TrainingDone

TINY = dict(start_from=NEW_MODEL, architecture="unet", encoder="resnet18", encoder_depth=3, crop_size=64,
            batch_size=4, crops_per_image=1, val_fraction=0.34, lr=0.003, device="cpu", show_preview=False)


def _tiny_widget(widget: TrainWidget, dataset, out_dir, epochs: int, name: str) -> None:
    widget.source.value = FROM_FOLDER
    widget.dataset.value = str(dataset)
    for key, value in TINY.items():
        getattr(widget, key).value = value
    widget.epochs.value = epochs
    widget.output_dir.value = str(out_dir)
    widget.model_name.value = name


def test_a_run_failing_after_its_best_epoch_keeps_and_lists_that_checkpoint(make_napari_viewer, small_consep,
                                                                            tmp_path, monkeypatch):
    """The loss turns NaN in epoch 2: the message says epoch 1's best checkpoint is kept, and it is
    (its folder had been deleted with it), listed in the Segment widget's models."""
    import napari_medseg.training.loop as loop

    real = loop._batch_loss

    def nan_from_epoch_2(run, image, labels, extra):
        loss = real(run, image, labels, extra)
        return loss * float("nan") if run.progress.history else loss

    monkeypatch.setattr(loop, "_batch_loss", nan_from_epoch_2)
    widget = TrainWidget(make_napari_viewer())
    _tiny_widget(widget, small_consep, tmp_path / "models", epochs=3, name="nan")

    assert widget.run(threaded=False) is None
    assert "The loss became nan at epoch 2" in widget.error and "the best checkpoint so far is kept" in widget.error
    best = tmp_path / "models" / "nan" / "best.safetensors"
    assert best.is_file() and load_checkpoint(best)[1].training["best_epoch"] == 1
    assert widget.trained_name == "trained: nan" and trained_models.path(widget.trained_name) == best
    assert "'trained: nan'" in widget.status.value
    assert widget.train_button.enabled and not widget.stop_button.enabled


def _job(dataset, out, epochs: int) -> TrainingJob:
    plan = plan_training(TrainForm(source=FROM_FOLDER, dataset=str(dataset), epochs=epochs, **TINY))
    run_dir, created = make_run_dir(out, "run")
    plan.cfg.out_dir = str(run_dir)
    return TrainingJob(plan.cfg, plan.items, preview=False, cleanup=created)


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.2)
    return condition()


def test_a_run_whose_worker_is_quit_after_a_best_epoch_keeps_its_checkpoint(small_consep, tmp_path, monkeypatch):
    """napari quits its workers when it closes: the generator closes mid-run, the process ends
    after its batch, and the best checkpoint so far stays (the folder had been removed as if the
    run had saved nothing, once the process ended)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the run's exchange folder and log go here
    job = _job(small_consep, tmp_path / "models", epochs=20)
    updates = job.updates()
    for update in updates:
        if isinstance(update, EpochDone) and update.best:
            break
        assert not isinstance(update, TrainingDone), update
    (work,) = [p for p in temp.iterdir() if p.is_dir()]
    updates.close()  # as the worker's quit does
    # the process ends after its batch, then its exchange folder goes: by then the run folder is decided
    assert _wait_for(lambda: not work.exists(), 90)
    time.sleep(0.5)
    best = tmp_path / "models" / "run" / "best.safetensors"
    assert best.is_file() and load_checkpoint(best)[1].training["best_epoch"] >= 1


HELPER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from napari_medseg._napari.train_form import FROM_FOLDER, TrainForm, plan_training
    from napari_medseg._napari.training_job import TrainingJob, make_run_dir
    from napari_medseg.training.events import BatchDone
    tiny = {tiny!r}
    plan = plan_training(TrainForm(source=FROM_FOLDER, dataset=sys.argv[1], epochs=5, **tiny))
    run_dir, created = make_run_dir(Path(sys.argv[2]), "run")
    plan.cfg.out_dir = str(run_dir)
    updates = TrainingJob(plan.cfg, plan.items, preview=False, cleanup=created).updates()
    for update in updates:
        if isinstance(update, BatchDone):
            break
    updates.close()  # the viewer closed in epoch 1, and napari exits at once
    print("closed", flush=True)
""")


def test_python_exiting_right_after_a_run_leaves_no_files_behind(small_consep, tmp_path):
    """napari exits right after closing a run that saved nothing: the run's empty folder and the
    process's exchange folder (a copy of the data) and log are gone (the thread removing them was
    a daemon, killed at exit: they stayed, a pair per run, in the temp folder)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    script = tmp_path / "helper.py"
    script.write_text(HELPER.format(tiny={**TINY, "crops_per_image": 8}))  # 8 steps an epoch: closed in the first
    env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(small_consep), str(tmp_path / "models")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr[-3000:]
    assert sorted(os.listdir(temp)) == []
    assert not (tmp_path / "models").exists(), sorted((tmp_path / "models").rglob("*"))


def test_closing_the_viewer_mid_run_raises_nothing_and_keeps_the_model(make_napari_viewer, qtbot, small_consep,
                                                                       tmp_path, monkeypatch):
    """The viewer closes during epoch 2: the run's last updates reached the destroyed controls
    ('wrapped C/C++ object of type QProgressBar has been deleted', one notification each); now
    they are not shown, and the run ends after its batch, keeping its best checkpoint."""
    from napari.utils.notifications import notification_manager

    errors = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *exc: errors.append(exc))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    _tiny_widget(widget, small_consep, tmp_path / "models", epochs=20, name="closed")
    widget.crops_per_image.value = 4  # 4 steps an epoch
    epochs, ended = [], []
    widget.update_received.connect(lambda u: epochs.append(u) if isinstance(u, EpochDone) else None)
    worker = widget.run()
    worker.finished.connect(lambda: ended.append(True))
    qtbot.waitUntil(lambda: bool(epochs), timeout=120_000)
    viewer.close()
    qtbot.waitUntil(lambda: bool(ended), timeout=60_000)
    assert errors == []
    best = tmp_path / "models" / "closed" / "best.safetensors"
    assert best.is_file() and load_checkpoint(best)[1].training["best_epoch"] >= 1


def test_an_empty_dataset_box_asks_for_a_folder(make_napari_viewer, tmp_path):
    """The box left empty read as the folder napari was started in: 'Error: /home/... is not a
    dataset folder'; now it asks for a folder, and nothing is made."""
    widget = TrainWidget(make_napari_viewer())
    _tiny_widget(widget, tmp_path, tmp_path / "models", epochs=1, name="x")
    widget.dataset.line_edit.value = ""  # the user empties the box (a new widget's box is empty too)
    assert widget.run(threaded=False) is None
    assert widget.error.startswith("Choose a dataset folder") and not (tmp_path / "models").exists()


def test_the_status_says_what_happens_from_the_first_second(make_napari_viewer, qtbot, small_consep, tmp_path):
    """Before its first batch a run spends 10-40 s starting (its process, torch, the data, the
    model): the bar is busy and the status says so (a bar at 0 % under 'Training into ...' looked
    stuck); the first batch says which epoch trains; a run stopped then leaves the bar idle."""
    from napari_medseg.training.events import BatchDone

    widget = TrainWidget(make_napari_viewer())
    _tiny_widget(widget, small_consep, tmp_path / "models", epochs=3, name="early")
    widget.crops_per_image.value = 4  # 4 steps an epoch
    seen = []

    def first_batch(update):
        if isinstance(update, BatchDone) and not seen:
            seen.append(widget.status.value)
            widget.stop()

    widget.update_received.connect(first_batch)
    widget.run()
    assert widget.progress.max == 0  # busy
    assert widget.status.value.startswith("Loading PyTorch, the data and the model")
    assert str(tmp_path / "models" / "early") in widget.status.value
    qtbot.waitUntil(lambda: widget.result is not None, timeout=120_000)
    assert seen[0] == f"Training into {tmp_path / 'models' / 'early'}: epoch 1/3..."
    assert widget.progress.max >= 1 and "no model was saved" in widget.status.value


def test_after_the_last_epoch_the_status_says_the_run_is_finishing(make_napari_viewer, small_consep, tmp_path):
    """After the last epoch a fine-tune re-tunes its start's nucleus threshold on the validation
    images (11 s for the default on 3 CoNSeP patches here) under the last epoch's line, with the
    bar full: the status now says so."""
    from napari_medseg._napari.train_form import DEFAULT_MODEL

    widget = TrainWidget(make_napari_viewer())
    _tiny_widget(widget, small_consep, tmp_path / "models", epochs=1, name="tuned")
    widget.start_from.value = DEFAULT_MODEL  # it has a tuned threshold
    widget.batch_size.value = 2
    last = []
    widget.update_received.connect(lambda u: last.append(widget.status.value) if isinstance(u, EpochDone) else None)
    done = widget.run(threaded=False)
    assert done is not None and done.checkpoint is not None, widget.status.value
    assert last[-1].startswith("Epoch 1/1: ") and last[-1].endswith(
        " Tuning the nucleus threshold on the validation images..."), last


@pytest.mark.parametrize("losses", [[], [0.71, 0.69], [0.02, 0.01], [2.5, 0.9]])
def test_the_loss_plots_labels_are_whole_at_the_docks_width(qtbot, losses):
    """The 'loss' label was pushed off the plot's left edge by wide tick labels: '-0.04' on the
    empty plot a run starts with (its loss axis from -0.05 to 0.05 for the first 10-40 s), and
    '0.695' for close losses (a fine-tune's)."""
    from napari_medseg._napari.loss_plot import LossPlot

    plot = LossPlot("dark")
    qtbot.addWidget(plot.canvas)
    plot._render(plot.data, float("nan"), (378, 500))  # every run starts empty
    for epoch, loss in enumerate(losses, 1):
        plot.add("train_loss", epoch, loss)
    plot._render(plot.data, float("nan"), (378, 500))  # the dock's width in the screenshots
    renderer = plot.figure.canvas.get_renderer()
    for ax in (plot.loss_ax, plot.metric_ax):
        label = ax.yaxis.label.get_window_extent(renderer)
        assert label.x0 >= 0, (ax.get_ylabel(), label, ax.get_ylim())
    low, high = plot.loss_ax.get_ylim()
    assert low >= 0 and high >= max(losses, default=0)  # the losses' range once there are some
