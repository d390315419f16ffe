"""Stop reaches a run while it scores its validation images, not only between training batches:
the widget's Stop had waited for the whole pass (seconds for the default's held-out images on a
CPU, longer for a folder of large images)."""

from __future__ import annotations

import pytest

from napari_medseg.training import BatchDone, EpochDone, StartScored, train
from napari_medseg.training.resume import read_resume

from test_resume_exact import tiny_config


def _stop_when(condition):
    """(said, state, on_update, should_stop): Stop is pressed at the first update that meets
    ``condition``; ``said`` collects the updates, ``state["checks"]`` counts the questions asked
    after the press."""
    state = {"stopped": False, "checks": 0}

    def on_update(update):
        said.append(update)
        if condition(update):
            state["stopped"] = True

    def should_stop():
        if state["stopped"]:
            state["checks"] += 1
        return state["stopped"]

    said: list = []
    return said, state, on_update, should_stop


@pytest.mark.usefixtures("one_torch_thread")
def test_stop_while_the_start_model_is_scored_ends_the_run_before_any_training(small_consep, tiny_checkpoint,
                                                                               tmp_path):
    said, state, on_update, should_stop = _stop_when(lambda u: isinstance(u, StartScored))
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=2", "data.val_fraction=0.34",
                      f"init_checkpoint={tiny_checkpoint}", "monitor=val_least_gain_over_start")
    done = train(cfg, on_update=on_update, should_stop=should_stop)
    assert done.stopped_early and done.reason == "stopped by user"
    assert done.checkpoint is None and done.history == [] and done.resume is None
    assert not list((tmp_path / "run").glob("*"))  # as a stop in the first epoch leaves it
    # the scoring was left at its first batch: no figures said, no batch trained
    assert [u.scores for u in said if isinstance(u, StartScored)] == [None]
    assert not any(isinstance(u, (BatchDone, EpochDone)) for u in said)
    assert state["checks"] == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_stop_while_an_epoch_is_validated_keeps_the_last_scored_epoch(small_consep, tmp_path):
    def last_batch_of_epoch_2(u):
        return isinstance(u, BatchDone) and u.epoch == 2 and u.step == u.steps

    said, state, on_update, should_stop = _stop_when(last_batch_of_epoch_2)
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=3", "data.val_fraction=0.34")
    done = train(cfg, on_update=on_update, should_stop=should_stop)
    assert done.stopped_early and done.reason == "stopped by user"
    # epoch 2 trained, but its validation was cut short: it is neither reported nor kept
    assert [u.epoch for u in said if isinstance(u, EpochDone)] == [1]
    assert [r["epoch"] for r in done.history] == [1] and done.best_epoch == 1
    assert done.checkpoint is not None and done.checkpoint.is_file()
    assert state["checks"] == 1  # the validation's first batch asked, and went no further
    # the resume file continues after epoch 1, the last one scored
    _, info = read_resume(done.resume)
    assert info["epoch"] == 1 and [r["epoch"] for r in info["history"]] == [1]
