"""Resuming as users do, on real CoNSeP patches with a tiny model on the CPU: a finished run
asked for more epochs says how to train on (it said only 'Resume with the same settings, or
start a new run'), and that advice works."""

from __future__ import annotations

import re

import pytest

from napari_medseg.training import load_train_config, train
from napari_medseg.training.resume import ResumeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1", "data.val_fraction=0.34"]


def tiny_config(dataset, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", *extra])


def test_more_epochs_for_a_finished_run_says_how_to_train_on(small_consep, tmp_path):
    run = tmp_path / "run"
    done = train(tiny_config(small_consep, f"out_dir={run}", "epochs=1"))
    with pytest.raises(ResumeError) as error:
        train(tiny_config(small_consep, f"out_dir={run}", "epochs=3", f"resume={done.resume}"))
    message = str(error.value)
    assert "epochs: 1 -> 3" in message
    advice = re.search(r"--set init_checkpoint=(\S+)", message)
    assert advice and advice.group(1) == str(run / "best.safetensors")
    # following it: a new run from the best checkpoint, in a new folder
    more = train(tiny_config(small_consep, f"out_dir={tmp_path / 'more'}", "epochs=2",
                             f"init_checkpoint={advice.group(1)}"))
    assert more.best_epoch >= 1 and more.checkpoint.parent == tmp_path / "more"
