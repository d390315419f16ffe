"""A lab's own export as a user brings it: images with nucleus masks beside them (0 / 255 PNGs,
16-bit instance PNGs, JPEG images), made into a dataset folder by `medseg convert masks`, then
predicted and scored; and a dataset folder whose 2-class masks hold 0 / 255."""

from __future__ import annotations

import json
import shutil

import numpy as np
import tifffile
from PIL import Image

from conftest import DATA
from hostile import medseg
from napari_medseg.io.dataset import open_dataset

TNBC = DATA / "tnbc_train"


def _export(folder):
    folder.mkdir()
    for stem in ("tnbc_01_1", "tnbc_02_1"):
        Image.open(TNBC / "images" / f"{stem}.png").convert("RGB").save(folder / f"{stem}.jpg", quality=90)
        mask = (tifffile.imread(TNBC / "labels" / f"{stem}.tif") > 0).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / f"{stem}_mask.png")
    stem = "train_2_006"
    shutil.copy(DATA / "consep_train" / "images" / f"{stem}.png", folder)
    instances = tifffile.imread(DATA / "consep_train" / "instances" / f"{stem}.tif").astype(np.uint16)
    Image.fromarray(instances).save(folder / f"{stem}_instances.png")
    shutil.copy(DATA / "consep_train" / "images" / "train_5_010.png", folder)  # no mask: left out, said
    return folder


def test_convert_masks_makes_a_dataset_folder_that_predict_and_evaluate_read(tmp_path, tiny_checkpoint):
    export = _export(tmp_path / "export")
    proc = medseg("convert", "masks", export, tmp_path / "ds")
    assert proc.returncode == 0, proc.stderr
    assert ("wrote 3 images into dataset folder" in proc.stdout and "2 as a binary nucleus mask" in proc.stdout
            and "1 as an instance map" in proc.stdout), proc.stdout
    assert "1 image without a mask beside it left out: train_5_010.png" in proc.stderr
    ds = open_dataset(tmp_path / "ds", require_labels=True)
    assert ds.classes == ["background", "nucleus"] and sorted(ds.stems) == ["tnbc_01_1", "tnbc_02_1", "train_2_006"]
    sample = ds.load("tnbc_01_1")
    truth = tifffile.imread(TNBC / "labels" / "tnbc_01_1.tif") > 0
    assert np.array_equal(sample.labels > 0, truth) and sample.labels.max() == 1
    assert sample.instances.max() > 10  # its connected components: every image has instances or none
    consep = ds.load("train_2_006")
    assert np.array_equal(consep.instances, tifffile.imread(DATA / "consep_train" / "instances" / "train_2_006.tif"))
    # the JPEG is copied as it is
    assert (tmp_path / "ds" / "images" / "tnbc_01_1.jpg").read_bytes() == (export / "tnbc_01_1.jpg").read_bytes()
    assert medseg("predict", tmp_path / "ds", "--model", tiny_checkpoint, "--out", tmp_path / "pred",
                  "--device", "cpu").returncode == 0
    scored = medseg("evaluate", tmp_path / "pred", tmp_path / "ds")
    assert scored.returncode == 0 and "nucleus Dice" in scored.stdout, scored.stderr
    # nothing is written into a folder that holds something
    again = medseg("convert", "masks", export, tmp_path / "ds")
    assert again.returncode != 0 and "is not empty" in again.stderr


def test_a_two_class_folder_of_0_255_masks_reads_255_as_nucleus(tmp_path):
    """Refused before as 'class id 255, but classes.json lists only 2 classes', even under
    labels: binary, where any non-zero value can only mean a nucleus."""
    root = tmp_path / "ds"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    shutil.copy(TNBC / "images" / "tnbc_01_1.png", root / "images")
    mask = (tifffile.imread(TNBC / "labels" / "tnbc_01_1.tif") > 0).astype(np.uint8)
    tifffile.imwrite(root / "labels" / "tnbc_01_1.tif", mask * 255)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "nucleus"]}))
    assert np.array_equal(open_dataset(root).load("tnbc_01_1").labels, mask)


def test_convert_masks_says_what_it_leaves_out_and_refuses_what_it_cannot_pair(tmp_path):
    """Two masks for one image (one had been taken silently), JPEG masks, a mask of another size
    (converted, then refused by training naming the converted file), two images of one name, a
    lone mask and an inverted mask: each refused or said, naming the user's files."""
    def converted(export):
        return medseg("convert", "masks", export, tmp_path / f"out_{export.name}")

    export = _export(tmp_path / "two")
    shutil.copy(export / "tnbc_01_1_mask.png", export / "tnbc_01_1_labels.png")
    proc = converted(export)
    assert proc.returncode != 0 and "tnbc_01_1_labels.png, tnbc_01_1_mask.png are all masks of one image" in proc.stderr
    assert not (tmp_path / "out_two").exists()  # nothing written

    export = _export(tmp_path / "jpeg")
    Image.open(export / "tnbc_01_1_mask.png").save(export / "tnbc_01_1_mask.jpg")
    (export / "tnbc_01_1_mask.png").unlink()
    assert "tnbc_01_1_mask.jpg: masks must be PNG or TIFF" in converted(export).stderr

    export = _export(tmp_path / "size")
    Image.open(export / "tnbc_01_1_mask.png").crop((0, 0, 100, 100)).save(export / "tnbc_01_1_mask.png")
    assert "tnbc_01_1_mask.png is 100x100 px but its image tnbc_01_1.jpg is 512x512" in converted(export).stderr

    export = _export(tmp_path / "case")
    shutil.copy(export / "train_5_010.png", export / "TRAIN_5_010.tif")
    assert "share a name: keep one of them" in converted(export).stderr

    export = _export(tmp_path / "notes")
    shutil.copy(export / "tnbc_01_1_mask.png", export / "lone_labels.png")
    inverted = 255 - np.asarray(Image.open(export / "tnbc_02_1_mask.png"))
    Image.fromarray(inverted).save(export / "tnbc_02_1_mask.png")
    proc = converted(export)
    assert proc.returncode == 0, proc.stderr
    assert "1 mask without an image of its name left out: lone_labels.png" in proc.stderr
    assert "1 mask marking most of its image as nucleus (inverted?" in proc.stderr
