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
    info = {"epoch": 2, "history": first.history, "best_epoch": first.best_epoch, **first.stop_rule_states()}
    resumed = progress("min_delta=0.05")
    resumed.restore(info)
    assert not resumed.add_epoch({"epoch": 3, "val_loss": 0.98}, {})  # worse than epoch 2's 0.97
    assert resumed.add_epoch({"epoch": 4, "val_loss": 0.965}, {}) and resumed.best_epoch == 4
