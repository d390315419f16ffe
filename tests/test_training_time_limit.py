"""A time limit (``medseg train --time-limit``, ``train(deadline=...)``): no epoch starts that
would end after it, the run keeps its best checkpoint and its resume file continues it; stages
after the one it stopped do not start. The clock is moved by hand: each epoch takes 100 s."""

from __future__ import annotations

import shlex

import pytest
import yaml

from napari_medseg.training import EpochDone, train
from napari_medseg.training import loop
from napari_medseg.training.loop import TIME_LIMIT
from napari_medseg.training.stages import load_train_stages, train_stages

from test_resume_exact import tiny_config

EPOCH_SECONDS = 100.0


@pytest.fixture
def hand_clock(monkeypatch):
    """``loop.clock`` stands still but for ``EPOCH_SECONDS`` at the end of every epoch."""
    now = {"t": 1000.0}
    monkeypatch.setattr(loop, "clock", lambda: now["t"])

    def on_update(update):
        if isinstance(update, EpochDone):
            now["t"] += EPOCH_SECONDS

    return now, on_update


@pytest.mark.usefixtures("one_torch_thread")
def test_no_epoch_starts_that_would_end_after_the_deadline_and_the_resume_file_goes_on(small_consep, tmp_path,
                                                                                      hand_clock):
    now, on_update = hand_clock
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=4", "data.val_fraction=0.34")
    # epochs 1 and 2 end at 1100 and 1200; epoch 3 would end at 1300, after 1250
    done = train(cfg, on_update=on_update, deadline=now["t"] + 2.5 * EPOCH_SECONDS)
    assert [r["epoch"] for r in done.history] == [1, 2]
    assert done.stopped_early and done.reason.startswith(TIME_LIMIT)
    assert "epoch 3 (about 100 s" in done.reason
    assert done.checkpoint is not None and done.checkpoint.is_file()
    assert done.resume is not None
    # the resume file continues the run to its end: the time limit was not saved as a reason to stop
    cfg.resume = str(done.resume)
    rest = train(cfg, on_update=on_update)
    assert [r["epoch"] for r in rest.history] == [1, 2, 3, 4] and not rest.stopped_early


@pytest.mark.usefixtures("one_torch_thread")
def test_a_deadline_already_passed_trains_nothing(small_consep, tmp_path, hand_clock):
    now, on_update = hand_clock
    done = train(tiny_config(small_consep, tmp_path / "run", "epochs=2"), on_update=on_update,
                 deadline=now["t"] - 1)
    assert done.history == [] and done.checkpoint is None
    assert done.reason == f"{TIME_LIMIT}: the time limit had passed before epoch 1 began"


@pytest.mark.usefixtures("one_torch_thread")
def test_stages_after_the_one_out_of_time_do_not_start_and_the_cli_says_how_to_go_on(small_consep, tmp_path,
                                                                                    hand_clock, capsys):
    from napari_medseg.cli import main
    from napari_medseg.cli.train import _TrainPrinter

    now, on_update = hand_clock
    config = tmp_path / "staged.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"architecture": "unet", "encoder": "resnet18", "encoder_depth": 3, "num_classes": 5},
        "data": {"dataset": [str(small_consep)], "crop_size": 64, "val_fraction": 0.34}, "batch_size": 4,
        "lr": 0.003, "epochs": 3, "num_threads": 1, "out_dir": str(tmp_path / "run"),
        "stages": [{"name": "a"}, {"name": "b"}]}))
    done = train_stages(load_train_stages(config), on_update=on_update, deadline=now["t"] + 4.5 * EPOCH_SECONDS)
    assert [len(r.history) for r in done.results] == [3, 1]  # b's epoch 2 would have ended at 5 x 100 s
    assert not (tmp_path / "run" / "c").exists()

    # the command line: minutes from now; the hint continues the stage that ran out of time
    printer_update = _TrainPrinter.update

    def moving(self, update):
        printer_update(self, update)
        on_update(update)

    cli_run = tmp_path / "cli"
    args = ["train", str(config), "--set", f"out_dir={cli_run}", "--time-limit", str(2.5 * EPOCH_SECONDS / 60)]
    import unittest.mock

    with unittest.mock.patch.object(_TrainPrinter, "update", moving):
        assert main(args) == 0
    captured = capsys.readouterr()
    assert f"stopped: {TIME_LIMIT}: epoch 3" in captured.out
    assert f"checkpoint {cli_run / 'a' / 'best.safetensors'}" in captured.out
    hint = next(line for line in captured.err.splitlines() if line.startswith("resume with: "))
    words = shlex.split(hint.removeprefix("resume with: "))
    assert words[:3] == ["medseg", "train", str(config)]
    assert words[-4:] == ["--from-stage", "a", "--resume", str(cli_run / "a" / "resume.safetensors")]
    assert not (cli_run / "b").exists()
    with unittest.mock.patch.object(_TrainPrinter, "update", moving):
        assert main(words[1:]) == 0  # as said: stage a's last epoch, then stage b
    assert (cli_run / "b" / "best.safetensors").is_file()


def test_time_limit_takes_minutes_above_zero(capsys):
    from napari_medseg.cli import main

    for bad in ("0", "-3", "soon", "nan"):
        assert main(["train", "configs/smoke.yaml", "--time-limit", bad]) == 2
        assert "--time-limit: takes a number above 0" in capsys.readouterr().err
