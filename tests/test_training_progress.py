"""A run's bookkeeping from epoch to epoch (training.progress): which epoch is the best, and
what a resumed run continues from."""

from __future__ import annotations

import pytest

from napari_medseg.training import load_train_config
from napari_medseg.training.progress import Progress


def progress(*settings, has_validation=True) -> Progress:
    return Progress.start(load_train_config(None, ["data.dataset=[x]", *settings]), has_validation)


@pytest.mark.parametrize("patience", [0, 2])
def test_the_best_epoch_is_the_best_value_whatever_min_delta(patience):
    prog = progress("min_delta=0.05", f"patience={patience}")
    saved = [prog.add_epoch({"epoch": e, "val_loss": v}, {}) for e, v in enumerate([1.00, 0.97, 0.96, 0.99], 1)]
    assert saved == [True, True, True, False] and prog.best_epoch == 3
    # min_delta still decides the stop: no improvement by more than 0.05 after epoch 1
    assert bool(prog.reason) == (patience == 2)


def test_a_higher_is_better_monitor_keeps_its_highest_epoch():
    prog = progress("min_delta=0.1", "monitor=val_miou")
    for e, miou in enumerate([0.50, 0.55, 0.52], 1):
        prog.add_epoch({"epoch": e, "val_loss": 1.0, "miou": miou}, {"miou": miou})
    assert prog.best_epoch == 2


def test_a_resumed_run_compares_with_its_best_epoch_so_far():
    first = progress("min_delta=0.05")
    for e, v in enumerate([1.00, 0.97], 1):
        first.add_epoch({"epoch": e, "val_loss": v}, {})
    info = {"epoch": 2, "history": first.history, "best_epoch": first.best_epoch, **first.resume_state()}
    resumed = progress("min_delta=0.05")
    resumed.restore(info)
    assert not resumed.add_epoch({"epoch": 3, "val_loss": 0.98}, {})  # worse than epoch 2's 0.97
    assert resumed.add_epoch({"epoch": 4, "val_loss": 0.965}, {}) and resumed.best_epoch == 4


def test_a_run_that_stopped_early_stays_stopped_when_resumed_by_either_rule():
    prog = progress("patience=1", "min_delta=10")
    for e, v in enumerate([1.0, 0.9], 1):
        prog.add_epoch({"epoch": e, "val_loss": v}, {})
    assert prog.reason
    resumed = progress("patience=1", "min_delta=10")
    resumed.restore({"epoch": 2, "history": prog.history, "best_epoch": prog.best_epoch, **prog.resume_state()})
    assert resumed.reason == prog.reason
    quad = ["quadratic_stop.enabled=true", "quadratic_stop.window=3", "quadratic_stop.start=3",
            "quadratic_stop.patience=0", "quadratic_stop.threshold=1e9"]
    prog = progress(*quad)
    for e, v in enumerate([1.0, 0.9, 0.8], 1):
        prog.add_epoch({"epoch": e, "val_loss": v}, {})
    assert "quadratic" in prog.reason
    resumed = progress(*quad)
    resumed.restore({"epoch": 3, "history": prog.history, "best_epoch": prog.best_epoch, **prog.resume_state()})
    assert resumed.reason == prog.reason
    # a run stopped by its user, or going on, is not
    going = progress("patience=3")
    going.add_epoch({"epoch": 1, "val_loss": 1.0}, {})
    going.add_epoch({"epoch": 2, "val_loss": 1.1}, {})
    again = progress("patience=3")
    again.restore({"epoch": 2, "history": going.history, "best_epoch": going.best_epoch, **going.resume_state()})
    assert again.reason == ""


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_an_early_stopped_run_trains_no_further(small_consep, tmp_path):
    from napari_medseg.training import EpochDone, train

    settings = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
                "batch_size=4", "num_threads=1", f"data.dataset=[{small_consep}]", f"out_dir={tmp_path / 'run'}",
                "epochs=6", "patience=1", "min_delta=10"]
    stopped = train(load_train_config(None, settings))
    assert stopped.stopped_early and len(stopped.history) == 2
    updates = []
    resumed = train(load_train_config(None, [*settings, f"resume={stopped.resume}"]), on_update=updates.append)
    assert not [u for u in updates if isinstance(u, EpochDone)]
    assert resumed.stopped_early and resumed.reason == stopped.reason
    assert resumed.history == stopped.history and resumed.best_epoch == stopped.best_epoch
