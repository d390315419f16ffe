"""Training on PanNuke folds: the official archive's layout read directly, and split as its
converted dataset folder is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_medseg.io import read_image, read_label_map
from napari_medseg.io.pannuke import PANNUKE_CLASSES
from napari_medseg.models import read_meta
from napari_medseg.training import load_train_config, train

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1"]
TISSUES = ["Colon", "Colon", "Breast", "Breast", "Adrenal_gland", "Adrenal_gland"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def make_fold(root: Path, consep: Path, nested: bool) -> Path:
    """A PanNuke fold of 6 real CoNSeP patches (its classes 1..4 in PanNuke's channels 0..3),
    in the official archive's layout (Fold 1/images/fold1/images.npy, ...) or flat."""
    stems = [f"train_{i}_005" for i in range(1, len(TISSUES) + 1)]
    images = np.stack([read_image(consep / "images" / f"{s}.png") for s in stems]).astype(np.float64)
    masks = np.zeros((len(stems), 256, 256, 6), np.float64)
    for i, s in enumerate(stems):
        cls, inst = read_label_map(consep / "labels" / f"{s}.tif"), read_label_map(consep / "instances" / f"{s}.tif")
        for c in range(1, 5):
            masks[i, ..., c - 1] = np.where(cls == c, inst, 0)
        masks[i, ..., 5] = cls == 0
    places = ({"images": root / "images" / "fold1", "types": root / "images" / "fold1", "masks": root / "masks" / "fold1"}
              if nested else {"images": root, "types": root, "masks": root})
    for name, array in (("images", images), ("masks", masks), ("types", np.array(TISSUES))):
        places[name].mkdir(parents=True, exist_ok=True)
        np.save(places[name] / f"{name}.npy", array)
    return root


@pytest.mark.usefixtures("one_torch_thread")
def test_a_fold_in_the_official_archive_layout_trains(consep, tmp_path):
    fold = make_fold(tmp_path / "Fold 1", consep, nested=True)
    result = train(tiny_config(fold, tmp_path / "run", "epochs=1", "data.val_fraction=0.34"))
    meta = read_meta(result.checkpoint)
    assert meta.classes == PANNUKE_CLASSES
    assert meta.data["train_images"] + meta.data["val_images"] == len(TISSUES)
