"""Scoring from Python as a script writer does it: the library's in-memory scores agree with
`medseg evaluate`, nucleus-only ground truth included (a walkthrough had got mIoU 0.006 from
``evaluate_maps`` where the CLI said 0.734, without a word)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from conftest import DATA
from hostile import medseg
from napari_medseg.evaluation.report import PairEvaluation, evaluate_folders, evaluate_maps
from napari_medseg.evaluation.semantic import MetricsInputError
from napari_medseg.io import read_label_map

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
NUCLEUS = ["background", "nucleus"]
STEMS = ("train_19_005", "train_2_006", "train_5_010")


def _classed(stem: str) -> tuple[np.ndarray, np.ndarray]:
    return (read_label_map(DATA / "consep_train" / "labels" / f"{stem}.tif"),
            read_label_map(DATA / "consep_train" / "instances" / f"{stem}.tif"))


def _shifted(class_map: np.ndarray, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A prediction that is not the truth: every nucleus moved 3 px right."""
    return np.roll(class_map, 3, axis=1), np.roll(instances, 3, axis=1)


def test_nucleus_only_truth_is_scored_nucleus_vs_background_and_said(tmp_path):
    """CoNSeP's annotation as a nucleus mask (TNBC's kind) against a 5-class prediction: with
    ``truth_classes`` the prediction's classes are merged, the numbers are those of the two
    binary maps, and the note says so; the pooled PairEvaluation agrees with `medseg evaluate`."""
    pooled = PairEvaluation(CONSEP_CLASSES, truth_classes=NUCLEUS)
    by_hand = PairEvaluation(NUCLEUS)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    for folder in ("images", "labels", "instances"):
        (truth_dir / folder).mkdir(parents=True)
    (pred_dir / "labels").mkdir(parents=True)
    (pred_dir / "instances").mkdir()
    for stem in STEMS:
        classes, instances = _classed(stem)
        pred, pred_instances = _shifted(classes, instances)
        mask = (classes > 0).astype(np.uint8)
        pooled.add(stem, mask, pred, instances, pred_instances)
        by_hand.add(stem, mask, (pred > 0).astype(np.uint8), instances, pred_instances)
        tifffile.imwrite(truth_dir / "labels" / f"{stem}.tif", mask)
        tifffile.imwrite(truth_dir / "instances" / f"{stem}.tif", instances)
        (truth_dir / "images" / f"{stem}.png").symlink_to(DATA / "consep_train" / "images" / f"{stem}.png")
        tifffile.imwrite(pred_dir / "labels" / f"{stem}.tif", pred)
        tifffile.imwrite(pred_dir / "instances" / f"{stem}.tif", pred_instances)
    (truth_dir / "classes.json").write_text(json.dumps({"classes": NUCLEUS}))
    (pred_dir / "classes.json").write_text(json.dumps({"classes": CONSEP_CLASSES}))
    report, expected = pooled.report(), by_hand.report()
    assert report["classes"] == NUCLEUS and report["classes_merged"]
    assert "merged into 'nucleus'" in report["note"]
    assert report["overall"] == pytest.approx(expected["overall"])
    assert 0.5 < report["overall"]["miou"] < 0.95 and 0.3 < report["overall"]["bpq"] < 0.9  # a shift, not a wipe-out
    from_folders = evaluate_folders(pred_dir, truth_dir)
    assert from_folders["overall"] == pytest.approx(report["overall"])
    assert "merged into 'nucleus'" in from_folders["note"]
    one = evaluate_maps((_classed(STEMS[0])[0] > 0).astype(np.uint8), _shifted(*_classed(STEMS[0]))[0],
                        CONSEP_CLASSES, truth_classes=NUCLEUS)
    assert one["classes_merged"] and one["overall"]["nucleus_dice"] == pytest.approx(
        report["per_image"][STEMS[0]]["nucleus_dice"])


def test_a_mask_scored_as_the_first_class_is_pointed_out():
    """Without ``truth_classes`` a mask's 1 is the prediction's first class ('other'): the
    numbers are what was asked for, but the report says the likelier reading and how to ask."""
    classes, instances = _classed(STEMS[0])
    pred, _ = _shifted(classes, instances)
    report = evaluate_maps((classes > 0).astype(np.uint8), pred, CONSEP_CLASSES)
    assert not report["classes_merged"]
    assert report["overall"]["miou"] < 0.3  # 'other' against every nucleus: what the walkthrough saw
    assert "truth_classes=['background', 'nucleus']" in report["note"]
    # a real class map of the same classes is not doubted
    assert "note" not in evaluate_maps(classes, pred, CONSEP_CLASSES)
    assert "note" not in evaluate_maps(classes, pred, CONSEP_CLASSES, truth_classes=CONSEP_CLASSES)


def test_a_named_nucleus_mask_may_hold_255_and_a_string_is_not_a_class_list():
    classes, instances = _classed(STEMS[0])
    pred, _ = _shifted(classes, instances)
    mask = (classes > 0).astype(np.uint8)
    as_255 = evaluate_maps(mask * 255, pred, CONSEP_CLASSES, truth_classes=NUCLEUS)
    assert as_255["overall"] == pytest.approx(evaluate_maps(mask, pred, CONSEP_CLASSES, truth_classes=NUCLEUS)["overall"])
    with pytest.raises(MetricsInputError, match="a list of names"):
        PairEvaluation(CONSEP_CLASSES, truth_classes="nucleus")


def test_other_classes_are_refused_and_binary_names_need_not_match():
    with pytest.raises(MetricsInputError, match="differ from the ground truth's"):
        PairEvaluation(CONSEP_CLASSES, truth_classes=["background", "a", "b", "c", "d"])
    mask = (_classed(STEMS[0])[0] > 0).astype(np.uint8)
    report = evaluate_maps(mask, mask, ["background", "nuclei"], truth_classes=NUCLEUS)
    assert report["overall"]["nucleus_dice"] == 1.0 and not report["classes_merged"]


def test_a_prediction_folder_without_classes_json_is_named_when_its_ids_do_not_fit(tmp_path):
    """Label maps saved from Python without classes.json, against TNBC-style truth: the refusal
    names the missing file (it had said only 'class id 4, outside 0..1')."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "mypred"
    for folder in ("images", "labels"):
        (truth_dir / folder).mkdir(parents=True)
    (pred_dir / "labels").mkdir(parents=True)
    classes, _ = _classed(STEMS[0])
    tifffile.imwrite(truth_dir / "labels" / f"{STEMS[0]}.tif", (classes > 0).astype(np.uint8))
    (truth_dir / "images" / f"{STEMS[0]}.png").symlink_to(DATA / "consep_train" / "images" / f"{STEMS[0]}.png")
    (truth_dir / "classes.json").write_text(json.dumps({"classes": NUCLEUS}))
    tifffile.imwrite(pred_dir / "labels" / f"{STEMS[0]}.tif", classes)
    proc = medseg("evaluate", pred_dir, truth_dir)
    assert proc.returncode != 0
    assert f"{pred_dir} has no classes.json" in proc.stderr and "Traceback" not in proc.stderr
    (pred_dir / "classes.json").write_text(json.dumps({"classes": CONSEP_CLASSES}))
    proc = medseg("evaluate", pred_dir, truth_dir)
    assert proc.returncode == 0, proc.stderr
    assert "merged into 'nucleus'" in proc.stderr


def test_predict_on_a_folder_leaves_out_the_masks_beside_the_images(tmp_path, tiny_checkpoint):
    """A lab's flat export, b.png beside b_mask.png: the masks had been segmented as images too
    (with 'dark background (fluorescence?)' notes). They are left out, and said so."""
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for stem in STEMS[:2]:
        (folder / f"{stem}.png").symlink_to(DATA / "consep_train" / "images" / f"{stem}.png")
        mask = (read_label_map(DATA / "consep_train" / "labels" / f"{stem}.tif") > 0).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / f"{stem}_mask.png")
    proc = medseg("predict", folder, "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "also holds 2 label maps named as such (train_19_005_mask.png, train_2_006_mask.png), not segmented" \
        in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == [f"{s}.tif" for s in sorted(STEMS[:2])]
    assert "fluorescence" not in proc.stderr
