"""Hostile input files and options: broken images, odd prediction folders, PanNuke folds with
NaN pixels or negative ids, negative sizes. Each gives a message naming the file or option and
what to do; nothing is written or lost."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import DATA
from hostile import assert_refused, dataset, medseg, model, tiny_dataset, tiny_model, tree  # noqa: F401 (fixtures)


def _truncated_tiff(path, shape=(256, 256, 3)):
    tifffile.imwrite(path, np.zeros(shape, np.uint8) + 7, tile=(64, 64), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header still promises every tile
    return path


@pytest.mark.parametrize("lazy", [False, True])
def test_a_tiff_lacking_the_data_its_header_claims_is_skipped_by_name(tmp_path, model, monkeypatch, lazy):
    # was traceback (KeyError / DeflateError) where the file was read lazily
    if lazy:
        import napari_medseg.inference.batch as batch

        monkeypatch.setattr(batch, "should_open_lazily", lambda path: True)
    image = _truncated_tiff(tmp_path / "cut.tif")
    out = tmp_path / "out"
    proc = medseg("predict", image, "--model", model, "--out", out, "--no-instances", "--tile", "64", "--overlap", "0")
    assert_refused(proc, "skipped", "'cut.tif'", "corrupt")
    assert "wrote no class map" in proc.stdout and not (out / "labels" / "cut.tif").exists()


def test_the_image_reader_names_a_truncated_tiff(tmp_path):
    from napari_medseg.io import ImageReadError, read_image

    with pytest.raises(ImageReadError, match="'cut.tif'.*corrupt, truncated"):
        read_image(_truncated_tiff(tmp_path / "cut.tif"))


@pytest.mark.parametrize("content", ['["background", "nucleus"]', '{"classes": "background"}', "{not json"])
def test_a_prediction_folder_with_a_broken_classes_json_is_named(tmp_path, dataset, content):  # was traceback
    pred = tmp_path / "pred"
    (pred / "labels").mkdir(parents=True)
    (pred / "classes.json").write_text(content)
    assert_refused(medseg("evaluate", pred, dataset), str(pred / "classes.json"), "'classes' list")


@pytest.mark.parametrize("option", ["--min-size=-5", "--min-distance=-1", "--tile=0", "--overlap=-3",
                                    "--batch-size=0", "--fill-holes=-1", "--min-object-size=x"])
def test_negative_sizes_are_refused_by_the_option_parser(tmp_path, dataset, model, option):  # was silent
    out = tmp_path / "out"
    err = assert_refused(medseg("predict", dataset, "--model", model, "--out", out, option), option.split("=")[0])
    assert "whole number" in err and not out.exists()


def _fold(root, images, masks):
    root.mkdir()
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    return root


@pytest.mark.parametrize("case, fragment", [
    ("nan", "image 1 of images.npy holds NaN"),  # was silent: black pixels
    ("negative", "mask 0 of masks.npy holds negative"),  # was silent: ids dropped
    ("fraction", "mask 0 of masks.npy holds negative, fractional"),
    ("empty", "the fold is empty"),  # was silent: "wrote dataset folder"
])
def test_pannuke_folds_with_impossible_values_are_refused_before_writing(tmp_path, case, fragment):
    images, masks = np.full((2, 16, 16, 3), 200.0), np.zeros((2, 16, 16, 6))
    masks[:, 4:8, 4:8, 0] = 3
    if case == "nan":
        images[1, 3, 3, 0] = np.nan
    elif case == "negative":
        masks[0, 0, 0, 1] = -2
    elif case == "fraction":
        masks[0, 0, 0, 2] = 1.5
    else:
        images, masks = images[:0], masks[:0]
    fold = _fold(tmp_path / "fold", images, masks)
    out = tmp_path / "converted"
    assert_refused(medseg("convert", "pannuke", fold, out), fragment)
    assert not out.exists()


def test_pannuke_convert_twice_into_one_folder_is_allowed(tmp_path):
    images, masks = np.full((2, 16, 16, 3), 200.0), np.zeros((2, 16, 16, 6))
    fold = _fold(tmp_path / "fold", images, masks)
    out = tmp_path / "converted"
    assert medseg("convert", "pannuke", fold, out).returncode == 0
    proc = medseg("convert", "pannuke", fold, out)
    assert proc.returncode == 0, proc.stderr


def test_another_pannuke_fold_never_replaces_a_converted_one(tmp_path):  # was LOSS: same stems, silently replaced
    masks = np.zeros((2, 16, 16, 6))
    first = _fold(tmp_path / "Fold 1", np.full((2, 16, 16, 3), 10.0), masks)
    second = _fold(tmp_path / "Fold 2", np.full((2, 16, 16, 3), 20.0), masks)
    out = tmp_path / "converted"
    assert medseg("convert", "pannuke", first, out).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert_refused(medseg("convert", "pannuke", second, out), "holds PanNuke fold Fold 1")
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before


def test_labels_saved_as_png_are_named_as_such(tmp_path, dataset, model):  # was vague: "lacks masks"
    label = dataset / "labels" / "a_0.tif"
    from PIL import Image

    Image.fromarray(tifffile.imread(label)).save(dataset / "labels" / "a_0.png")
    label.unlink()
    before = tree(dataset)
    assert_refused(medseg("tune-threshold", model, dataset, "--all-images", "--out", tmp_path / "t.safetensors"),
                   "lacks masks", "a_0.png must be saved as .tif")
    assert tree(dataset) == before and not (tmp_path / "t.safetensors").exists()


def test_inputs_that_are_not_images(tmp_path, model):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    out = tmp_path / "out"
    proc = medseg("predict", empty, text, "--model", model, "--out", out)
    assert_refused(proc, "'empty.png': the file is empty", "'notes.tif'")
    assert "wrote no class map" in proc.stdout
    assert_refused(medseg("predict", tmp_path / "missing.png", "--model", model, "--out", out), "does not exist")
    (tmp_path / "nothing").mkdir()
    assert_refused(medseg("predict", tmp_path / "nothing", "--model", model, "--out", out), "no images")


def test_a_gray_image_through_a_colour_model_is_warned_about(tmp_path, model, consep):  # was silent
    """A gray copy of a real H&E patch: the run goes on, with a note that names the cause."""
    from PIL import Image

    from napari_medseg.io import read_image

    colour = read_image(consep / "images" / "train_1_005.png")[:96, :96]
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(colour.mean(-1).astype(np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(colour.mean(-1, keepdims=True), 3, -1).astype(np.uint8)).save(tmp_path / "gray_rgb.png")
    proc = medseg("predict", tmp_path / "colour.png", tmp_path / "gray.png", tmp_path / "gray_rgb.png",
                  "--model", model, "--out", tmp_path / "out", "--no-instances")
    assert proc.returncode == 0, proc.stderr
    warned = [line.split(":")[0].strip() for line in proc.stderr.splitlines() if "image is gray" in line]
    assert warned == ["gray.png", "gray_rgb.png"], proc.stderr
    assert (tmp_path / "out" / "labels" / "gray.tif").is_file()  # warned, not refused


SLIDE_FOLDER = DATA / "slides"


@pytest.mark.parametrize("args, fragments", [
    (["predict", "x.png", "--out", "o", "--pixel-size", "100"], ["from 0.05 to 20.0", "not the magnification"]),
    (["predict", SLIDE_FOLDER / "CMU-1-Small-Regoin.svs", "--out", "o"], ["no such file", "Regoin"]),  # was: "--region takes whole-slide files"
    (["predict", SLIDE_FOLDER, "--out", "o"], ["holds whole slides", "CMU-1-Small-Region.svs", "--whole-slide"]),
    (["web", "--port", "99999"], ["from 1 to 65535"]),  # was: OverflowError
    (["average", "a.safetensors", "b.safetensors", "--crops", "0"], ["at least 1"]),  # was: ValueError deep in torch
    (["average", "default", "default", "--weight", "0.5", "--out", "o.safetensors", "--config", "configs/default.yaml"],
     ["--config is read for --batchnorm measure or --threshold tune"]),  # was: read for nothing, said nothing
    (["evaluate", "o", DATA / "tnbc_train"], ["prediction folder", "does not exist"]),  # was: "holds no prediction"
    (["average", "default", "default", "--out", "avdir/"], ["avdir/ is a folder", "avdir/model.safetensors"]),  # was: a file 'avdir'
    (["tune-threshold", "default", DATA / "tnbc_train", "--out", "x.pt"], ["name it x.safetensors"]),  # was: safetensors as .pt
])
def test_cli_mistakes_get_their_own_message(tmp_path, args, fragments):
    assert_refused(medseg(*[tmp_path / a if a in ("o", "o.safetensors") else a for a in args]), *fragments)
