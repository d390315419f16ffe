"""Shared fixtures: the real data in ../shared/data and tiny models for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# torch's compiler front end before any test draws a viewer: a test that loads a model itself
# after a viewer has drawn (Mesa's LLVM mapped) would otherwise segfault importing Triton when it
# runs alone (in the whole suite an earlier test had imported it). The plugin's own guard is
# tested in a fresh process (test_napari_menu.py).
from napari_medseg._napari.torch_import import import_torch_dynamo  # noqa: E402

import_torch_dynamo()

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
CONSEP = DATA / "consep_train"
MONUSEG = DATA / "monuseg_train"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (use with ``pytest.mark.usefixtures``).

    Few shared cores: more torch threads than free cores spin at OpenMP barriers (a 64x64
    forward went from 15 ms to 700 ms with 2 threads beside a training run).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def consep() -> Path:
    if not CONSEP.is_dir():
        pytest.fail(f"Real test data missing: {CONSEP} (set MEDSEG_DATA to the folder holding consep_train).")
    return CONSEP


@pytest.fixture(scope="session")
def monuseg() -> Path:
    if not MONUSEG.is_dir():
        pytest.fail(f"Real test data missing: {MONUSEG}.")
    return MONUSEG


@pytest.fixture(scope="session")
def real_512(consep) -> np.ndarray:
    """A larger real image: four CoNSeP patches of one source image, 2x2, 512x512 (read-only)."""
    from napari_medseg.io import read_image

    p = [read_image(consep / "images" / f"train_4_{i:03d}.png") for i in (0, 1, 4, 5)]
    image = np.concatenate([np.concatenate(p[:2], axis=1), np.concatenate(p[2:], axis=1)], axis=0)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    image.setflags(write=False)  # shared by many tests: none may change it
    return image


def copy_small_consep(consep: Path, out: Path) -> Path:
    """6 real CoNSeP patches from 3 source images copied into a dataset folder ``out``."""
    import shutil

    stems = [f"train_{i}_{j:03d}" for i in (1, 2, 3) for j in (5, 6)]
    for sub, ext in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
        (out / sub).mkdir(parents=True)
        for stem in stems:
            shutil.copy(consep / sub / f"{stem}{ext}", out / sub / f"{stem}{ext}")
    shutil.copy(consep / "classes.json", out / "classes.json")
    return out


def copy_small_tnbc(out: Path) -> Path:
    """3 real TNBC fields of 3 slides (nucleus-only masks: background, nucleus) copied into a
    dataset folder ``out``: a lab's usual annotation."""
    import shutil

    for sub in ("images", "labels", "instances"):
        (out / sub).mkdir(parents=True)
    for stem in ("tnbc_01_1", "tnbc_02_1", "tnbc_03_1"):
        shutil.copy(DATA / "tnbc_train" / "images" / f"{stem}.png", out / "images")
        for sub in ("labels", "instances"):
            shutil.copy(DATA / "tnbc_train" / sub / f"{stem}.tif", out / sub)
    shutil.copy(DATA / "tnbc_train" / "classes.json", out)
    return out


@pytest.fixture
def small_consep(consep, tmp_path) -> Path:
    """A dataset folder of 6 real CoNSeP patches from 3 source images (a copy, safe to modify)."""
    return copy_small_consep(consep, tmp_path / "consep_small")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny U-Net (resnet18, depth 3) for the 5 CoNSeP classes, as a checkpoint file."""
    import torch

    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3)
    model = build_model(cfg).eval()
    meta = CheckpointMeta(model=cfg, classes=["background", "other", "inflammatory", "epithelial", "spindle"])
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", model, meta)


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    """The untrained tiny U-Net (resnet18, depth 3: output stride 8) loaded for inference, once per module."""
    from napari_medseg.inference import Segmenter

    return Segmenter.load(tiny_checkpoint, device="cpu")


def read_rgb(path: Path) -> np.ndarray:
    from napari_medseg.io import read_image

    return read_image(path)
