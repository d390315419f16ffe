"""A resumed run gives the weights of an uninterrupted one: with DataLoader workers too."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from napari_medseg.training import load_train_config, train

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def weights(resume_file) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(resume_file)).items() if k.startswith("model.")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_at_training_check(n: int):
    """A ``should_stop`` that says stop at the ``n``-th check between training batches. Validation
    asks too (before each of its batches), and is not counted: these runs count batches."""
    calls = {"n": 0}

    def stop():
        if sys._getframe(1).f_code.co_name != "train_one_epoch":
            return False
        calls["n"] += 1
        return calls["n"] >= n

    return stop


def stop_in_epoch_2():
    return stop_at_training_check(3)  # 8 crops / batch 4 = 2 steps per epoch; the 3rd check opens epoch 2


# DataLoader workers run in a process of their own here: a process that ever had them keeps
# torch's SIGCHLD handler, and a later test's child process exiting then crashed the test session
# (SIGSEGV on delivery, after an in-process `medseg predict` had run).
WORKER_RUNS = """
import sys
import torch
from safetensors.torch import load_file
from napari_medseg.training import load_train_config, train

data, out = sys.argv[1], sys.argv[2]
TINY = {tiny!r}
def config(name, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{{data}}]", f"out_dir={{out}}/{{name}}", *extra])
def weights(path):
    return {{k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}}
def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
calls = {{"n": 0}}
def stop():  # 8 crops / batch 4 = 2 steps per epoch; the 3rd check between batches opens epoch 2
    if sys._getframe(1).f_code.co_name != "train_one_epoch":
        return False  # validation's checks
    calls["n"] += 1
    return calls["n"] >= 3
extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2")
# a run with a persistent worker, interrupted in epoch 2 and resumed, against an uninterrupted one
full = train(config("full", *extra, "data.num_workers=1"))
part = train(config("part", *extra, "data.num_workers=1"), should_stop=stop)
assert part.reason == "stopped by user" and len(part.history) == 1
resumed = train(config("part", *extra, "data.num_workers=1", f"resume={{part.resume}}"))
assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
print("resumed == uninterrupted:", same(weights(full.resume), weights(resumed.resume)))
print("same losses:", [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history])
# each crop's augmentation drawn from its own seed, not from the state of the process drawing it
alone = train(config("alone", *extra, "data.num_workers=0"))
print("workers == no workers:", same(weights(full.resume), weights(alone.resume)))
"""


def test_resume_with_persistent_workers_continues_exactly_and_workers_augment_as_the_process_would(
        small_consep, tmp_path):
    import subprocess
    import sys

    script = WORKER_RUNS.format(tiny=TINY)
    proc = subprocess.run([sys.executable, "-c", script, str(small_consep), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-3:] == ["resumed == uninterrupted: True", "same losses: True",
                                             "workers == no workers: True"], proc.stdout


def test_crops_and_their_augmentation_seeds_are_a_function_of_seed_and_epoch():
    from napari_medseg.training.setup import AugmentationSeeds, EpochSampler

    def drawn(seed, epoch, rank=0):
        sampler = AugmentationSeeds(EpochSampler(50, 20, seed), seed, rank)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = drawn(0, 3)
    assert len(first) == 20 and len({crop for crop, _ in first}) == 20  # 20 different crops of 50
    assert drawn(0, 3) == first  # a fresh sampler (a resumed run) draws the same
    assert drawn(0, 4) != first and drawn(1, 3) != first
    assert [s for _, s in drawn(0, 3, rank=1)] != [s for _, s in first]  # each rank its own augmentation


def test_a_crop_seed_fixes_its_augmentation_and_leaves_the_process_state_alone(small_consep):
    from napari_medseg.training.config import AugmentConfig
    from napari_medseg.training.data import PatchDataset, load_dataset_folders

    items, _ = load_dataset_folders([str(small_consep)], r"^(.*)_\d+$")
    ds = PatchDataset(items[:1], 64, augment=AugmentConfig(stain=0.05))
    state = torch.random.get_rng_state()
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[(0, 124)][0], a[0])


def test_the_worker_count_may_change_on_resume():
    from napari_medseg.training.resume import config_differences

    given = {"lr": 0.1, "data": {"num_workers": 4, "crop_size": 64}}
    assert config_differences(given, {"lr": 0.1, "data": {"num_workers": 0, "crop_size": 64}}) == []
    assert config_differences(given, {"lr": 0.1, "data": {"num_workers": 0, "crop_size": 32}}) == \
        ["data.crop_size: 32 -> 64"]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_resumed_runs_recorded_config_makes_it_again(small_consep, tmp_path):
    from napari_medseg.models import read_meta
    from napari_medseg.training import TrainConfig
    from napari_medseg.training.resume import read_resume

    extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2")
    part = train(tiny_config(small_consep, tmp_path / "part", *extra), should_stop=stop_in_epoch_2())
    resumed = train(tiny_config(small_consep, tmp_path / "part", *extra, f"resume={part.resume}"))
    recorded = read_meta(resumed.checkpoint).training["config"]
    assert recorded["resume"] is None
    # the recorded config trains the same model again, from scratch
    again = train(TrainConfig.from_dict({**recorded, "out_dir": str(tmp_path / "again")}))
    assert same(weights(resumed.resume), weights(again.resume))
    # ... and may resume the run it records (whose config as given left model.num_classes to the data)
    info = read_resume(resumed.resume)[1]
    assert info["config_given"]["model"]["num_classes"] != recorded["model"]["num_classes"]
    done = train(TrainConfig.from_dict({**recorded, "out_dir": str(tmp_path / "part"), "resume": str(resumed.resume)}))
    assert [h["train_loss"] for h in done.history] == [h["train_loss"] for h in resumed.history]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_resumed_run_goes_on_in_its_own_folder_whatever_out_dir_says(small_consep, tmp_path):
    import shutil

    from napari_medseg.training import TrainingError

    extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2")
    part = train(tiny_config(small_consep, tmp_path / "run", *extra), should_stop=stop_in_epoch_2())
    resumed = train(tiny_config(small_consep, tmp_path / "elsewhere", *extra, f"resume={part.resume}"))
    assert resumed.checkpoint == tmp_path / "run" / "best.safetensors" and resumed.checkpoint.is_file()
    assert resumed.resume == tmp_path / "run" / "resume.safetensors"
    assert not (tmp_path / "elsewhere").exists()
    # a resume file away from its run's best checkpoint is refused, not continued without it
    (tmp_path / "copy").mkdir()
    shutil.copy(resumed.resume, tmp_path / "copy" / "resume.safetensors")
    with pytest.raises(TrainingError, match="best.safetensors is missing"):
        train(tiny_config(small_consep, tmp_path / "copy", *extra, f"resume={tmp_path / 'copy' / 'resume.safetensors'}"))


def test_the_loss_scalers_state_carries_over(tmp_path):
    # float16 training (CUDA) scales its loss; a resumed run must go on with the scale reached, not
    # start again at 65536 (it would skip other steps). A CPU scaler stands in for the CUDA one.
    from napari_medseg.training.resume import read_resume, restore, save_resume

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 256.0, "_growth_tracker": 17})
    save_resume(tmp_path / "resume.safetensors", model, optimizer, None, torch.Generator(), {"epoch": 1}, scaler)
    tensors, info = read_resume(tmp_path / "resume.safetensors")
    fresh = torch.amp.GradScaler("cpu")
    restore(tensors, info, torch.nn.Linear(2, 2), torch.optim.AdamW(model.parameters()), None, torch.Generator(),
            fresh)
    assert fresh.state_dict()["scale"] == 256.0 and fresh.state_dict()["_growth_tracker"] == 17
