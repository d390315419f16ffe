"""``medseg`` as a newcomer met it, second round: ``medseg info default`` was 600 lines of JSON
with no summary, the web page offered fluorescence to an H&E model, and ``medseg evaluate``
scored fewer images than the folder held without a word, and said '(1 images'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hostile import assert_refused, medseg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_info_says_what_the_default_is_for_in_a_screenful():
    """Before: ~600 lines of JSON. Now a summary: architecture, classes, pixel size, tiles,
    weights, where the file is, training data and held-out figures; the JSON behind --json."""
    proc = medseg("info", "default")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 40, proc.stdout
    text = proc.stdout
    for fragment in ("unet, encoder mobilenet_v2", "background, other, inflammatory, epithelial, spindle",
                     "0.25 µm/px (about 40x)", "trained on 256x256 px crops", "256 px tiles",
                     "default.safetensors", "MB (float16)", "consep_train (classes)",
                     "monuseg_train (nucleus vs background)", "419 training images, 76 validation images",
                     "H&E images at 40x", "medseg info --json"):
        assert fragment in text, fragment
    assert any(line.startswith("held out") and "consep_train (64 images" in line for line in lines)
    assert "tnbc_train (10 images" in text and "nucleus Dice 0.8" in text  # every set's figures, not the first only
    assert not text.lstrip().startswith("{")
    # mPQ only where the set has classes: for a nucleus-vs-background set it is bPQ again
    held_out = text[text.index("\nheld out"):text.index("\nabout")]
    assert held_out.count("mPQ") == 1 and "mPQ 0.223" in held_out


def test_info_json_is_the_whole_record():
    proc = medseg("info", "default", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["model"]["encoder"] == "mobilenet_v2" and record["pixel_size_um"] == 0.25
    assert record["training"]["history"]["epochs"] == 43  # the best epoch's record; all with --history
    assert len(json.loads(medseg("info", "--history").stdout)["training"]["history"]) == 43


def test_info_of_a_bare_checkpoint_says_what_is_not_recorded(tiny_checkpoint):
    proc = medseg("info", tiny_checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert "encoder resnet18" in proc.stdout and "not recorded" in proc.stdout
    assert str(tiny_checkpoint.resolve()) in proc.stdout
    assert f"medseg info {tiny_checkpoint} --json" in proc.stdout  # the hint names the model asked about


def test_web_page_says_which_stain_the_default_is_for():
    """The page had said 'Upload H&E or fluorescence images' over a model trained on H&E only."""
    pytest.importorskip("gradio", reason="the web extra (gradio) is part of the test install")
    from napari_medseg.web.app import SUBTITLE

    assert "brightfield H&E" in SUBTITLE and "0.25 µm/px" in SUBTITLE
    assert "H&E or fluorescence" not in SUBTITLE
    assert "not for fluorescence" in SUBTITLE  # said as what it is not for, never offered


def test_web_page_warns_on_a_dark_background_as_its_subtitle_says(tmp_path):
    """The subtitle promises a warning on a dark-background (fluorescence-like) image: it comes."""
    pytest.importorskip("gradio", reason="the web extra (gradio) is part of the test install")
    import numpy as np
    from PIL import Image

    from napari_medseg.inference.source import DARK_NOTE
    from napari_medseg.web.session import DEFAULT_MODEL, ModelStore, segment_upload

    image = np.full((128, 128, 3), 6, np.uint8)  # black glass, a few bright blue blobs: DAPI-like
    for y, x in ((20, 30), (60, 90), (100, 40)):
        image[y - 6:y + 6, x - 6:x + 6, 2] = 200
    path = tmp_path / "dark.png"
    Image.fromarray(image).save(path)
    store = ModelStore(backend="torch")
    with store.lock:
        result = segment_upload(path, store.get(DEFAULT_MODEL))
    assert DARK_NOTE in result.notes


def _folders(tmp_path: Path, truth: list[str], predicted: list[str]) -> tuple[Path, Path]:
    """A ground-truth folder of CoNSeP ``truth`` stems and a prediction folder of ``predicted``
    (the ground truth's own class maps: a perfect prediction where both have the stem)."""
    consep = DATA / "consep_train"
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for sub in ("images", "labels"):
        (gt / sub).mkdir(parents=True)
    (pred / "labels").mkdir(parents=True)
    shutil.copy(consep / "classes.json", gt / "classes.json")
    for stem in truth:
        shutil.copy(consep / "images" / f"{stem}.png", gt / "images")
        shutil.copy(consep / "labels" / f"{stem}.tif", gt / "labels")
    for stem in predicted:
        shutil.copy(consep / "labels" / f"{stem}.tif", pred / "labels")
    return gt, pred


def test_evaluate_says_which_predictions_had_no_ground_truth_and_counts_one_image(tmp_path):
    """Before: the 3 extra predictions went unscored without a word, and '(1 images; ...'."""
    gt, pred = _folders(tmp_path, ["train_19_005"], ["train_19_005", "train_19_006", "train_19_007", "train_12_001"])
    proc = medseg("evaluate", pred, gt, "--json", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    assert (f"3 predictions in {pred / 'labels'} have no ground truth in {gt} "
            "(train_12_001, train_19_006, train_19_007): not scored.") in proc.stderr
    assert "(1 image; aggregations in the JSON)" in proc.stdout and "1 images" not in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["predictions_without_ground_truth"] == ["train_12_001", "train_19_006", "train_19_007"]
    assert report["images"] == 1


def test_evaluate_names_at_most_three_and_counts_two_images(tmp_path):
    extra = ["train_12_001", "train_12_002", "train_12_003", "train_12_004", "train_12_005"]
    gt, pred = _folders(tmp_path, ["train_19_005", "train_19_006"], ["train_19_005", "train_19_006", *extra])
    proc = medseg("evaluate", pred, gt)
    assert proc.returncode == 0, proc.stderr
    assert "5 predictions in" in proc.stderr and "(train_12_001, train_12_002, train_12_003, ...)" in proc.stderr
    assert "(2 images; aggregations in the JSON)" in proc.stdout


def test_evaluate_says_nothing_of_extra_predictions_where_there_are_none(tmp_path):
    gt, pred = _folders(tmp_path, ["train_19_005", "train_19_006"], ["train_19_005", "train_19_006"])
    proc = medseg("evaluate", pred, gt)
    assert proc.returncode == 0, proc.stderr
    assert "no ground truth" not in proc.stderr


def test_evaluate_refusals_count_in_the_right_number_and_name_predictions_of_other_images(tmp_path):
    """'lacks predictions for 1 image(s)' and 'any of the 1 ground-truth images' before; a refusal
    now also says which predictions match no ground-truth image (renamed files, another set)."""
    gt, pred = _folders(tmp_path / "one_missing", ["train_19_005", "train_19_008"], ["train_19_005", "train_12_001"])
    proc = medseg("evaluate", pred, gt)
    assert_refused(proc, f"lacks predictions for 1 image: train_19_008; predict every image of the ground truth's "
                         f"folder: medseg predict {gt} --out {pred}",
                   f"1 prediction in {pred / 'labels'} has no ground truth in {gt} (train_12_001): is {gt} the "
                   "folder it was predicted from?")
    assert "image(s)" not in proc.stderr

    gt, pred = _folders(tmp_path / "none_match", ["train_19_005"], ["train_12_001", "train_12_002"])
    proc = medseg("evaluate", pred, gt)
    assert_refused(proc, "holds no prediction for the one ground-truth image",
                   "2 predictions in", "(train_12_001, train_12_002): is", "folder they were predicted from?")

    gt, pred = _folders(tmp_path / "two_missing", ["train_19_005", "train_19_006", "train_19_007"], ["train_19_005"])
    assert_refused(medseg("evaluate", pred, gt), "lacks predictions for 2 images: train_19_006, train_19_007;")


def _one_image_dataset(consep, root, subs=("labels",)):
    """A dataset folder of one CoNSeP patch (train_19_005): its image, the ``subs`` maps, classes.json."""
    for sub in ("images", *subs):
        (root / sub).mkdir(parents=True)
    shutil.copy(consep / "images" / "train_19_005.png", root / "images")
    for sub in subs:
        shutil.copy(consep / sub / "train_19_005.tif", root / sub)
    shutil.copy(consep / "classes.json", root)
    return root


def test_evaluate_never_writes_its_json_over_an_input_or_an_existing_file(tmp_path, consep):
    """'medseg evaluate pred gt --json gt/labels/x.tif' had written JSON over the annotation it
    read (exit 0), and over the dataset's image or classes.json alike."""
    stem = "train_19_005"
    gt = _one_image_dataset(consep, tmp_path / "gt", ("labels", "instances"))
    pred = tmp_path / "pred"
    (pred / "labels").mkdir(parents=True)
    shutil.copy(consep / "labels" / f"{stem}.tif", pred / "labels")  # the truth as a perfect prediction
    before = {p: p.read_bytes() for p in [*gt.rglob("*.*"), *pred.rglob("*.*")]}
    for target in (gt / "labels" / f"{stem}.tif", gt / "classes.json", pred / "labels" / f"{stem}.tif"):
        for extra in ((), ("--overwrite",)):
            proc = medseg("evaluate", pred, gt, "--json", target, *extra)
            assert proc.returncode == 2, proc.stdout
            assert f"--json {target} is a file of the input" in proc.stderr and "Choose a file elsewhere" in proc.stderr
    assert {p: p.read_bytes() for p in before} == before  # nothing written over
    report = tmp_path / "report.json"
    report.write_text("mine")
    proc = medseg("evaluate", pred, gt, "--json", report)
    assert proc.returncode == 2 and "exists: choose another file or pass --overwrite" in proc.stderr
    assert report.read_text() == "mine"
    assert medseg("evaluate", pred, gt, "--json", report, "--overwrite").returncode == 0
    assert json.loads(report.read_text())["overall"]["nucleus_dice"] == 1.0
    assert medseg("evaluate", pred, gt, "--json", pred / "scores.json").returncode == 0  # new: replaces nothing
    # a report beside the predictions, written before, is no input: replaced when asked
    assert medseg("evaluate", pred, gt, "--json", pred / "scores.json").returncode == 2
    assert medseg("evaluate", pred, gt, "--json", pred / "scores.json", "--overwrite").returncode == 0


def test_a_tuner_never_writes_over_the_dataset_it_read(tmp_path, consep):
    gt = _one_image_dataset(consep, tmp_path / "gt")
    before = (gt / "classes.json").read_bytes()
    proc = medseg("tune-threshold", "default", gt, "--out", gt / "classes.json", "--all-images", "--overwrite")
    assert proc.returncode == 2 and "checkpoints are written as safetensors files" in proc.stderr, proc.stderr
    assert (gt / "classes.json").read_bytes() == before
    (gt / "images" / "x.safetensors").write_bytes(b"not a checkpoint")  # a checkpoint's name, in a folder read
    proc = medseg("tune-threshold", "default", gt, "--out", gt / "images" / "x.safetensors", "--all-images",
                  "--overwrite")
    assert proc.returncode == 2 and "is a file of the input" in proc.stderr, proc.stderr


def test_swapped_arguments_are_said_and_help_pages_show_examples(tmp_path, consep, tiny_checkpoint):
    """'medseg tune-threshold DATASET MODEL' had said 'Checkpoint ... is a folder, not a file', and
    'medseg evaluate DATASET PREDICTIONS' that the predictions were no dataset folder."""
    gt = _one_image_dataset(consep, tmp_path / "gt")
    pred = tmp_path / "pred"
    (pred / "labels").mkdir(parents=True)
    shutil.copy(consep / "labels" / "train_19_005.tif", pred / "labels")
    proc = medseg("tune-threshold", gt, tiny_checkpoint, "--out", tmp_path / "t.safetensors")
    assert proc.returncode == 2 and "is a dataset folder: the model comes first" in proc.stderr, proc.stderr
    assert "medseg tune-threshold MODEL DATASET" in proc.stderr
    proc = medseg("evaluate", gt, pred)
    assert proc.returncode == 2 and "the two look swapped" in proc.stderr, proc.stderr
    assert "medseg evaluate PREDICTIONS DATASET" in proc.stderr
    for command in ("predict", "evaluate", "tune-threshold"):
        assert "examples:\n  medseg " in medseg(command, "--help").stdout


def test_tuning_on_one_image_says_it_is_few(tmp_path, consep, tiny_checkpoint):
    gt = _one_image_dataset(consep, tmp_path / "gt")
    proc = medseg("tune-threshold", tiny_checkpoint, gt, "--all-images", "--out", tmp_path / "t.safetensors",
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "on 1 image" in proc.stdout and "caution: tuned on 1 image" in proc.stderr


def test_a_folders_images_in_formats_not_read_are_named(tmp_path, consep, tiny_checkpoint):
    """A .bmp beside the PNGs had been left out without a word ('3 of 4' to the user who counted)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(consep / "images" / "train_19_005.png", folder)
    Image.open(folder / "train_19_005.png").convert("RGB").save(folder / "scan.bmp")
    (folder / "notes.txt").write_text("not an image: not named")
    proc = medseg("predict", folder, "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "also holds 1 image in formats not read here (scan.bmp), skipped: save them as PNG or TIFF" in proc.stderr
    assert "notes.txt" not in proc.stderr and "wrote 1 class map" in proc.stdout


def test_an_image_too_small_for_a_nucleus_is_said_so(tmp_path, tiny_checkpoint):
    """An 8 x 8 image had come back empty, exit 0, with no word of its size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, shape in (("tiny.png", (8, 8, 3)), ("strip.png", (1, 256, 3)), ("field.png", (64, 64, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name)
    proc = medseg("predict", tmp_path / "tiny.png", tmp_path / "strip.png", tmp_path / "field.png",
                  "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "tiny.png: the image is only 8 x 8 px: too small to show whole nuclei" in proc.stderr
    assert "strip.png: the image is only 256 x 1 px" in proc.stderr
    assert "field.png: the image is only" not in proc.stderr
