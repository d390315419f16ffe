"""average_with_start when the run is fine-tuned into its start checkpoint's own folder: its
first best checkpoint replaces the start, and the average must still be with the real start."""

from __future__ import annotations

import shutil

import pytest
import torch

from napari_medseg.training import TrainingError, load_train_config, train

from test_resume_exact import stop_at_training_check

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1", "data.val_fraction=0.34"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


@pytest.mark.usefixtures("one_torch_thread")
def test_fine_tuning_into_the_starts_folder_averages_with_the_real_start(small_consep, tmp_path):
    from safetensors.torch import load_file

    from napari_medseg.models import read_meta

    run = tmp_path / "run"
    start = train(tiny_config(small_consep, run, "epochs=1")).checkpoint
    shutil.copy(start, tmp_path / "start_copy.safetensors")
    # a constant lr: every step moves the weights by about lr (a 2-step cosine run warms up at
    # lr / 25, then ends the cycle)
    done = train(tiny_config(small_consep, run, "epochs=2", "lr=0.01", "schedule=constant", f"init_checkpoint={start}",
                             "average_with_start=0.5"))
    assert done.checkpoint == run / "averaged.safetensors"
    before, best, averaged = (load_file(str(p)) for p in (tmp_path / "start_copy.safetensors", run / "best.safetensors",
                                                         done.checkpoint))
    key = "segmentation_head.0.weight"
    assert not torch.equal(best[key], before[key])  # the start's file now holds the run's best
    expected = 0.5 * before[key].float() + 0.5 * best[key].float()
    assert torch.allclose(averaged[key].float(), expected, atol=1e-3)
    assert not torch.allclose(averaged[key].float(), best[key].float(), atol=1e-3)
    record = read_meta(done.checkpoint).training["averaged"]
    assert record["start"] == f"{start} (as it was before this run replaced it)"
    assert sorted(p.name for p in run.iterdir()) == ["averaged.safetensors", "best.safetensors", "resume.safetensors"]


@pytest.mark.usefixtures("one_torch_thread")
def test_such_a_run_resumed_cannot_average_and_says_so(small_consep, tmp_path):
    run = tmp_path / "run"
    start = train(tiny_config(small_consep, run, "epochs=1")).checkpoint
    extra = ("epochs=2", f"init_checkpoint={start}", "average_with_start=0.5")
    # 4 crops / batch 4 = 1 step per epoch; the 2nd check between batches opens epoch 2
    part = train(tiny_config(small_consep, run, *extra), should_stop=stop_at_training_check(2))
    assert part.reason == "stopped by user"
    with pytest.raises(TrainingError, match="cannot average with it"):
        train(tiny_config(small_consep, run, *extra, f"resume={part.resume}"))
