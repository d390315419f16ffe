"""Short runs as users make them (a fine-tune of a few steps), on real CoNSeP patches, tiny
models, CPU: a cosine schedule warms up however few its steps; ``data.samples_per_epoch`` gives
the crops asked for; a resume file named in a staged config is its first stage's only."""

from __future__ import annotations

import pytest

from napari_medseg.training import BatchDone, load_train_config, train
from napari_medseg.training.stages import load_train_stages

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "num_threads=1", "data.val_fraction=0.34", "save_resume=false"]
LR = 0.003


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"lr={LR}", f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def test_a_three_step_cosine_run_warms_up_then_ends_low(small_consep, tmp_path):
    """4 training images, batch 4: one step an epoch, 3 epochs. Each epoch's record has its step's
    lr: lr / 25, lr, then the cycle's end. Before: no warm-up below 10 steps (0.84 lr, 0.30 lr, 0):
    Adam's first step moved every weight by about 0.84 lr."""
    done = train(tiny_config(small_consep, tmp_path / "run", "epochs=3"))
    lrs = [r["lr"] for r in done.history]
    assert lrs[0] == pytest.approx(LR / 25)
    assert lrs[1] == pytest.approx(LR)
    assert lrs[2] < LR / 1000


def test_a_one_step_run_learns_at_the_warm_ups_start_not_at_the_cycles_end(small_consep, tmp_path):
    """Before: the only step of a one-step cosine run had lr / 25 / 10^4 (1.2e-7 here): nothing changed."""
    done = train(tiny_config(small_consep, tmp_path / "run", "epochs=1"))
    assert done.history[0]["lr"] == pytest.approx(LR / 25)


def test_every_short_cosine_run_starts_low_peaks_and_ends_below_its_peak():
    import torch

    from napari_medseg.training.config import TrainConfig
    from napari_medseg.training.optimisation import build_optimisation

    for steps in range(2, 25):
        cfg = TrainConfig(lr=1.0, epochs=1)
        model = torch.nn.Linear(2, 1)
        optim = build_optimisation(cfg, model, steps, None)
        lrs = [optim.step(model(torch.ones(1, 2)).sum()) for _ in range(steps)]
        assert lrs[0] == pytest.approx(1 / 25), steps
        assert lrs[-1] < 0.01, steps
        if steps >= 3:
            assert max(lrs) > 0.95, steps
            assert lrs.index(max(lrs)) <= max(1, steps // 10), steps  # the warm-up: a tenth, at least one step


def test_samples_per_epoch_above_the_crops_there_are_gives_what_was_asked(small_consep, tmp_path):
    """4 training images, one crop each: 24 samples an epoch are 6 steps of 4 (before: cut to the
    4 crops there are, one step, without a word)."""
    steps = []
    done = train(tiny_config(small_consep, tmp_path / "run", "epochs=1", "data.samples_per_epoch=24",
                             "data.val_fraction=0.34"),
                 on_update=lambda u: steps.append(u.steps) if isinstance(u, BatchDone) else None)
    assert steps and set(steps) == {6} and len(steps) == 6
    from napari_medseg.models import read_meta

    assert read_meta(done.checkpoint).data["crops_per_epoch"] == 24


def test_samples_per_epoch_below_the_crops_there_are_still_draws_different_ones():
    from napari_medseg.training.setup import EpochSampler

    sampler = EpochSampler(10, 6, seed=0)
    drawn = list(sampler)
    assert len(drawn) == 6 and len(set(drawn)) == 6
    more = list(EpochSampler(10, 25, seed=0))
    assert len(more) == 25 and set(more) == set(range(10))
    assert more[:6] == drawn  # the first ones as before
    assert all(more.count(i) in (2, 3) for i in range(10))  # each drawn as evenly as can be


def test_a_resume_file_in_a_staged_config_is_the_first_stages_only(tmp_path):
    """Before: every stage took it, and the second stage refused it ('The config differs from the
    run being resumed') after the first had trained."""
    config = tmp_path / "staged.yaml"
    config.write_text(f"model: {{architecture: unet, encoder: resnet18, encoder_depth: 3}}\n"
                      f"data: {{dataset: [x], crop_size: 64}}\nout_dir: {tmp_path / 'run'}\n"
                      f"resume: {tmp_path / 'run' / 'a' / 'resume.safetensors'}\n"
                      "stages:\n  - name: a\n  - name: b\n    lr: 0.0005\n")
    a, b = load_train_stages(config)
    assert a.config.resume == str(tmp_path / "run" / "a" / "resume.safetensors") and b.config.resume is None
    a, b = load_train_stages(config, [f"resume={tmp_path / 'other.safetensors'}"])
    assert a.config.resume == str(tmp_path / "other.safetensors") and b.config.resume is None
    (b,) = load_train_stages(config, [f"resume={tmp_path / 'run' / 'b' / 'resume.safetensors'}"], from_stage="b")
    assert b.config.resume == str(tmp_path / "run" / "b" / "resume.safetensors")
