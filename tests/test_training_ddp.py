"""DistributedDataParallel: ``torchrun --nproc_per_node 2 -m napari_medseg train`` with gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from napari_medseg.models import load_checkpoint
from napari_medseg.training.distributed import parameter_hash

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_processes_train_identical_weights(small_consep, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_medseg", "train", str(REPO / "configs" / "smoke.yaml"),
           "--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}", "--set", "data.val_fraction=0.34",
           "--set", "data.crops_per_image=2", "--set", "batch_size=2", "--set", "num_threads=1",
           "--set", "device=cpu", "--set", "epochs=2"]
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
