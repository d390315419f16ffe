"""DistributedDataParallel: ``torchrun --nproc_per_node 2 -m napari_medseg train`` with gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_medseg.models import load_checkpoint
from napari_medseg.training.distributed import parameter_hash

REPO = Path(__file__).resolve().parents[1]
# smoke.yaml draws 128 crops an epoch, from these few images again and again (it had been cut to
# the crops there are, without a word): each crop once, as these runs count on
EACH_CROP_ONCE = ["--set", "data.samples_per_epoch=0"]


@pytest.mark.parametrize("extra", [[], ["--set", "ema_decay=0.5"]], ids=["weights", "moving_average"])
def test_torchrun_two_cpu_processes_train_identical_weights(small_consep, tmp_path, extra):
    """With ema_decay the best checkpoint is the weights' average: the same on every rank too."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_medseg", "train", str(REPO / "configs" / "smoke.yaml"),
           "--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}", "--set", "data.val_fraction=0.34",
           "--set", "data.crops_per_image=2", "--set", "batch_size=2", "--set", "num_threads=1",
           "--set", "device=cpu", "--set", "epochs=2", *EACH_CROP_ONCE, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 prints the per-epoch lines
    assert proc.stdout.count("epoch 2/2  train_loss") == 1, proc.stdout
    model, meta = load_checkpoint(run / "best.safetensors")
    dist = meta.training["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    hashes = dist["parameter_hash_prefixes"]
    # every rank held the same parameters when the best checkpoint was written ...
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # ... and they are the weights in the file
    assert parameter_hash(model)[:15] == hashes[0]
    # 4 training images x 2 crops = 8 crops, sharded: 4 per rank, batch 2 -> 2 steps per rank per epoch
    assert meta.data["crops_per_epoch"] == 8
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def _torchrun(args, cwd, snapshot_after_epoch_1: Path | None = None):
    """Run ``torchrun`` on 2 CPU processes; with ``snapshot_after_epoch_1``, copy the run's resume
    file and best checkpoint there once rank 0 reports epoch 1 (both are written before the
    report, atomically)."""
    import shutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_medseg", "train", str(REPO / "configs" / "smoke.yaml"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    out = []
    for line in proc.stdout:
        out.append(line)
        if snapshot_after_epoch_1 is not None and line.startswith("epoch 1/"):
            out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("out_dir=")))
            snapshot_after_epoch_1.mkdir(parents=True)
            for name in ("best.safetensors", "resume.safetensors"):
                shutil.copy(out_dir / name, snapshot_after_epoch_1 / name)
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 0, "".join(out)[-3000:] + err[-3000:]
    return "".join(out)


def test_torchrun_resume_continues_exactly_on_every_rank(small_consep, tmp_path):
    # FPN has dropout: each rank draws its own masks, which the resumed ranks must draw again
    from safetensors.torch import load_file

    from napari_medseg.training.resume import read_resume

    common = ["--set", f"data.dataset=[{small_consep}]", "--set", "data.val_fraction=0.34",
              "--set", "model.architecture=fpn", "--set", "data.crops_per_image=2", "--set", "batch_size=2",
              "--set", "num_threads=1", "--set", "device=cpu", "--set", "epochs=2", *EACH_CROP_ONCE]
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(["--set", f"out_dir={full}", *common], tmp_path, snapshot_after_epoch_1=part)
    assert read_resume(part / "resume.safetensors")[1]["epoch"] == 1
    out = _torchrun(["--set", f"out_dir={part}", *common, "--resume", str(part / "resume.safetensors")], tmp_path)
    assert "epoch 1/2" not in out and out.count("epoch 2/2  train_loss") == 1
    a, b = load_file(str(full / "resume.safetensors")), load_file(str(part / "resume.safetensors"))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)


def test_torchrun_draws_the_samples_per_epoch_of_a_single_process_run(small_consep, tmp_path):
    # 4 training images x 4 crops = 16 crops; samples_per_epoch 4: 2 per rank, 1 step of 2 each
    run = tmp_path / "run"
    _torchrun(["--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}", "--set", "data.val_fraction=0.34",
               "--set", "data.crops_per_image=4", "--set", "data.samples_per_epoch=4", "--set", "batch_size=2",
               "--set", "num_threads=1", "--set", "device=cpu", "--set", "epochs=1"], tmp_path)
    meta = load_checkpoint(run / "best.safetensors")[1]
    assert meta.data["crops_per_epoch"] == 4
    assert meta.training["history"][0]["epoch"] == 1


def test_torchrun_refuses_a_gpu_that_is_not_there_with_a_message(tmp_path, monkeypatch):
    """device=cuda under torchrun with no GPU (or more processes than GPUs) is refused with a
    message saying what to change; it was torch's traceback ('Found no NVIDIA driver')."""
    import pytest

    from napari_medseg.devices import DeviceError
    from napari_medseg.training import distributed

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_medseg", "train", str(REPO / "configs" / "smoke.yaml"),
           "--set", f"out_dir={tmp_path / 'run'}", "--set", "device=cuda"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "medseg train: error: Device 'cuda' requested but this machine has no CUDA GPU" in proc.stderr
    assert "set device=cpu" in proc.stderr and "Found no NVIDIA driver" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    # two GPUs, a third process: told how many to start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="Process 2 on this machine needs GPU 2, but it has 2"):
        distributed._check_gpu_for(2, "cuda")


def test_resuming_with_another_number_of_processes_is_refused_with_the_command(small_consep, tmp_path):
    """A run of one process resumed under torchrun with two (or the reverse, as the interrupted
    run's hint suggested): the crops are shared out otherwise and DDP trains other parameters,
    so it failed with the optimizer's 'loaded state dict contains a parameter group that doesn't
    match'; now it is refused before training, saying how many processes to resume with."""
    from napari_medseg.training.config import load_train_config
    from napari_medseg.training.events import EpochDone
    from napari_medseg.training.trainer import train

    run = tmp_path / "run"
    settings = [f"data.dataset=[{small_consep}]", "data.val_fraction=0.34", "data.crops_per_image=2", "batch_size=2",
                "num_threads=1", "device=cpu", "epochs=3", EACH_CROP_ONCE[1]]
    cfg = load_train_config(REPO / "configs" / "smoke.yaml", [*settings, f"out_dir={run}"])
    epochs = []
    done = train(cfg, on_update=lambda u: epochs.append(u) if isinstance(u, EpochDone) else None,
                 should_stop=lambda: bool(epochs))  # interrupted in epoch 2
    assert done.best_epoch == 1 and done.resume.is_file()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_medseg", "train", str(REPO / "configs" / "smoke.yaml"),
           *[w for s in [*settings, f"out_dir={run}"] for w in ("--set", s)], "--resume", str(done.resume)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert ("The run being resumed was trained by 1 process, this one has 2; resume it with as many "
            f"(medseg train CONFIG --resume {done.resume}, without torchrun)") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("medseg train: error:")[0]


def test_torchrun_trains_repeats_in_one_process_group(small_consep, tmp_path):
    """repeats (and stages) call train() again in the same processes: the process group was made
    anew for each and the ranks raced for its gloo port ('Gloo connectFullMesh failed ...
    Connection refused', in half of the 2-repeat runs here); it now lives as long as the processes."""
    import json

    run = tmp_path / "run"
    out = _torchrun(["--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}", "--set", "data.val_fraction=0.34",
                     "--set", "data.crops_per_image=1", "--set", "batch_size=2", "--set", "num_threads=1",
                     "--set", "device=cpu", "--set", "epochs=1", "--set", "repeats=4", *EACH_CROP_ONCE], tmp_path)
    assert "4 runs (seeds 0, 1, 2, 3)" in out
    assert len(json.loads((run / "repeats.json").read_text())["runs"]) == 4
    for seed in range(4):
        meta = load_checkpoint(run / f"seed_{seed}" / "best.safetensors")[1]
        hashes = meta.training["distributed"]["parameter_hash_prefixes"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]
