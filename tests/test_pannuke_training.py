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


def test_a_fold_splits_alike_read_directly_and_converted(consep, tmp_path):
    # each patch is its own source image either way (patches of a fold come from many slides):
    # the same patches are held out, not whole tissues once converted
    from napari_medseg.io.pannuke import convert_pannuke
    from napari_medseg.training.setup import prepare_data

    fold = make_fold(tmp_path / "fold1", consep, nested=False)
    converted = convert_pannuke(fold, tmp_path / "converted")
    held_out = []
    for dataset in (fold, converted):
        cfg = tiny_config(dataset, tmp_path / "run", "data.val_fraction=0.34")
        data = prepare_data(cfg, None, None)
        assert len({it.group for it in data.train_items + data.val_items}) == len(TISSUES)
        held_out.append(sorted(it.name for it in data.val_items))
    assert held_out[0] == held_out[1] and len(held_out[0]) == 2


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_convert_refuses_an_output_in_or_around_its_fold(consep, tmp_path, where):
    from napari_medseg.io.dataset import DatasetError
    from napari_medseg.io.pannuke import convert_pannuke

    fold = make_fold(tmp_path / "data" / "fold1", consep, nested=where != "same")
    out = {"same": fold, "inside": fold / "converted", "around": fold.parent}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DatasetError, match="convert into a folder of its own, outside the fold"):
        convert_pannuke(fold, out)
    with pytest.raises(DatasetError, match="outside the fold"):  # the fold named by its images.npy too
        convert_pannuke(next(fold.rglob("images.npy")), out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_tuning_finds_a_converted_folds_images_by_patch_and_by_the_older_tissue_groups(consep, tmp_path):
    from napari_medseg.evaluation.threshold import samples_of_groups
    from napari_medseg.io.pannuke import convert_pannuke

    converted = convert_pannuke(make_fold(tmp_path / "fold1", consep, nested=False), tmp_path / "converted")
    _, samples = samples_of_groups(converted, ["converted/Colon_0", "converted/Breast_3"])
    assert [(s.stem, s.group) for s in samples] == [("Breast_3", "Breast_3"), ("Colon_0", "Colon_0")]
    # a model trained on it before each patch was its own group recorded tissues
    _, samples = samples_of_groups(converted, ["converted/Colon"])
    assert sorted(s.stem for s in samples) == ["Colon_0", "Colon_1"]
