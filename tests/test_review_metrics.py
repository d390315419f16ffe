"""Review of comparing a prediction with ground truth: medseg evaluate's folder comparison on real
CoNSeP patches (what it says about the nuclei it scored, bad folders), against a slow reference
written from the published definitions."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import copy_small_consep
from napari_medseg.io import read_label_map
from napari_medseg.io.dataset import DatasetError
from napari_medseg.evaluation.report import evaluate_folders
from napari_medseg.evaluation.semantic import MetricsInputError
from napari_medseg.nuclei.watershed import InstanceSettings


def _prediction_folder(gt: Path, out: Path, instances: bool = True) -> Path:
    """A 'prediction' as medseg predict writes it: the ground truth shifted 2 px, one nucleus in
    eight dropped, instance ids made huge and non-contiguous (uint32)."""
    (out / "labels").mkdir(parents=True)
    if instances:
        (out / "instances").mkdir()
    shutil.copy(gt / "classes.json", out / "classes.json")
    for k, path in enumerate(sorted((gt / "labels").glob("*.tif"))):
        cm = np.roll(read_label_map(path), 2, axis=1)
        inst = np.roll(read_label_map(gt / "instances" / path.name).astype(np.int64), 2, axis=1)
        ids = np.unique(inst)[1:]
        dropped = np.isin(inst, ids[k::8])
        cm[dropped], inst[dropped] = 0, 0
        tifffile.imwrite(out / "labels" / path.name, cm)
        if instances:
            tifffile.imwrite(out / "instances" / path.name,
                             np.where(inst > 0, inst * 7919 + 2**31, 0).astype(np.uint32))
    return out


def _ref_pq_counts(gt, pred):
    """Kirillov et al.: pairs with IoU > 0.5, one mask per instance."""
    tp, iou_sum = 0, 0.0
    for g in np.unique(gt)[1:]:
        gm = gt == g
        for p in np.unique(pred[gm]):
            if p:
                pm = pred == p
                iou = (gm & pm).sum() / (gm | pm).sum()
                if iou > 0.5:
                    tp, iou_sum = tp + 1, iou_sum + iou
    return tp, len(np.unique(pred)) - 1 - tp, len(np.unique(gt)) - 1 - tp, iou_sum


def _pq(tp, fp, fn, iou_sum):
    return iou_sum / (tp + fp / 2 + fn / 2) if tp + fp + fn else math.nan


def _ref_aji(gt, pred):
    """Kumar et al. 2017: each nucleus with its prediction of highest IoU; unused predictions join the union."""
    inter = union = 0
    used = set()
    for g in np.unique(gt)[1:]:
        gm = gt == g
        best = max(((((gm & (pred == p)).sum() / (gm | (pred == p)).sum()), -p) for p in np.unique(pred[gm]) if p),
                   default=None)
        if best is None:
            union += gm.sum()
            continue
        pm = pred == -best[1]
        inter, union = inter + (gm & pm).sum(), union + (gm | pm).sum()
        used.add(-best[1])
    union += sum((pred == p).sum() for p in np.unique(pred)[1:] if p not in used)
    return inter / union


def _by_class(instances, class_map, c):
    keep = [i for i in np.unique(instances)[1:] if np.bincount(class_map[instances == i], minlength=5)[1:].argmax() + 1 == c
            and class_map[instances == i].any()]
    return np.where(np.isin(instances, keep), instances, 0)


def test_folder_scores_match_a_slow_reference_on_real_consep(consep, tmp_path):
    gt = copy_small_consep(consep, tmp_path / "gt")
    pred = _prediction_folder(gt, tmp_path / "pred")
    report = evaluate_folders(pred, gt)
    bpq, mpq, aji_parts, pooled = [], [], [], {c: np.zeros(4) for c in range(1, 5)}
    for path in sorted((gt / "labels").glob("*.tif")):
        g_cm, g_in = read_label_map(path), read_label_map(gt / "instances" / path.name).astype(np.int64)
        p_cm, p_in = read_label_map(pred / "labels" / path.name), read_label_map(pred / "instances" / path.name)
        p_in = p_in.astype(np.int64)
        bpq.append(_pq(*_ref_pq_counts(g_in, p_in)))
        per_image = []
        for c in range(1, 5):
            g_c = _by_class(g_in, g_cm, c)
            counts = _ref_pq_counts(g_c, _by_class(p_in, p_cm, c))
            pooled[c] += counts
            if g_c.any():
                per_image.append(_pq(*counts))
        mpq.append(np.mean(per_image))
        aji_parts.append(_ref_aji(g_in, p_in))
    overall = report["overall"]
    assert overall["bpq"] == pytest.approx(np.mean(bpq), abs=1e-12)
    assert overall["mpq"] == pytest.approx(np.mean(mpq), abs=1e-12)
    assert overall["mpq_plus"] == pytest.approx(np.nanmean([_pq(*pooled[c]) for c in pooled]), abs=1e-12)
    assert report["images"] == 6 and 0.3 < overall["aji"] < 1


def test_evaluate_says_where_nuclei_came_from_and_which_settings_went_unused(consep, tmp_path):
    """medseg evaluate --min-size 200 on medseg predict's folder (instance maps on both sides): the
    numbers cannot change, and the report had not said why (the option was silently ignored)."""
    gt = copy_small_consep(consep, tmp_path / "gt")
    pred = _prediction_folder(gt, tmp_path / "pred")
    plain = evaluate_folders(pred, gt, InstanceSettings())
    given = evaluate_folders(pred, gt, InstanceSettings(min_size=200, min_distance=9))
    assert given["overall"] == plain["overall"]
    assert "note" not in plain
    assert "min_distance 9, min_size 200 were not used" in given["note"]
    assert given["instances"] == {"prediction": f"instance maps in {pred / 'instances'}",
                                  "ground_truth": f"instance maps in {gt / 'instances'}"}
    json.dumps(given)  # the report stays JSON
    # without the prediction's instance maps the settings cut its nuclei: no such note
    derived = _prediction_folder(gt, tmp_path / "pred_derived", instances=False)
    report = evaluate_folders(derived, gt, InstanceSettings(min_size=200))
    assert "note" not in report and report["instances"]["prediction"].startswith("derived")
    assert report["overall"]["bpq"] != plain["overall"]["bpq"]


def test_predictions_saved_as_png_are_named(consep, tmp_path):
    gt = copy_small_consep(consep, tmp_path / "gt")
    pred = tmp_path / "pred" / "labels"
    pred.mkdir(parents=True)
    for path in (gt / "labels").glob("*.tif"):
        tifffile.imwrite(pred / f"{path.stem}.png", read_label_map(path))  # any bytes: the name is the point
    with pytest.raises(DatasetError, match=r"train_1_005\.png.*not \.tif.*<stem>\.tif"):
        evaluate_folders(pred.parent, gt)


@pytest.mark.parametrize("stem", ["train_17_010", "train_18_004"])
def test_an_instance_map_with_a_stray_piece_is_read_as_the_annotated_nuclei(consep, stem):
    """An unnamed ground truth in the viewer or the browser: a real CoNSeP instance map with one
    nucleus in two pieces (a 1-5 px stray bit; 3 of MoNuSeg's 13 maps have such) had been read as
    'a class map of classes the model does not have', its nuclei then cut anew by the watershed
    (MoNuSeg TCGA-50-5931 against the default model: bPQ 0.446 instead of medseg evaluate's 0.463)."""
    from napari_medseg.evaluation.ground_truth import compare_to_ground_truth, ground_truth_from_label_map
    from napari_medseg.evaluation.report import evaluate_maps

    classes = json.loads((consep / "classes.json").read_text())["classes"]
    instances = read_label_map(consep / "instances" / f"{stem}.tif")
    class_map = read_label_map(consep / "labels" / f"{stem}.tif")
    pred, pred_instances = np.roll(class_map, 2, axis=0), np.roll(instances, 2, axis=0).astype(np.int32)
    truth = ground_truth_from_label_map(instances, classes)
    assert truth.nucleus_only and truth.reading.startswith("an instance map"), truth.reading
    assert "1 of its" in truth.reading and "in more than one piece" in truth.reading
    report = compare_to_ground_truth(pred, classes, truth, pred_instances)
    expected = evaluate_maps((instances > 0).astype(np.uint8), (pred > 0).astype(np.uint8), ["background", "nucleus"],
                             gt_instances=instances, pred_instances=pred_instances)
    assert report["overall"]["bpq"] == pytest.approx(expected["overall"]["bpq"], abs=1e-12)
    assert report["overall"]["aji"] == pytest.approx(expected["overall"]["aji"], abs=1e-12)


def test_a_class_map_with_one_class_in_pieces_stays_a_class_map(consep):
    """The relaxed instance-map rule needs many ids: a map of 5 classes, 4 of them one nucleus each and
    one in pieces, is not taken for 5 nuclei."""
    from napari_medseg.evaluation.ground_truth import ground_truth_from_label_map

    instances = read_label_map(consep / "instances" / "train_19_005.tif")
    ids = np.unique(instances)[1:]
    labels = np.zeros_like(instances, dtype=np.uint8)
    for value, nucleus in enumerate(ids[:4], start=1):
        labels[instances == nucleus] = value
    labels[np.isin(instances, ids[4:])] = 5  # a sixth class the model does not have, many nuclei
    truth = ground_truth_from_label_map(labels, ["background", "other", "inflammatory", "epithelial", "spindle"])
    assert truth.instances is None and "classes the model does not have" in truth.reading


def test_an_instance_map_of_another_size_is_named_by_its_side(consep, tmp_path):
    """A folder pair has two instance maps per image: the message says the prediction's is off (it had
    said only 'Instance map shape ... differs from its class map's'; the ground truth's is refused
    by the dataset reader, named)."""
    gt = copy_small_consep(consep, tmp_path / "gt")
    pred = _prediction_folder(gt, tmp_path / "pred")
    path = pred / "instances" / "train_3_006.tif"
    tifffile.imwrite(path, read_label_map(path)[:100])
    with pytest.raises(MetricsInputError, match=r"train_3_006: The predicted instance map has shape \(100, 256\)"):
        evaluate_folders(pred, gt)


def test_a_nucleus_only_models_folder_is_scored_against_classed_ground_truth(consep, tmp_path):
    """A binary model's ``medseg predict`` folder (classes background / nucleus) against CoNSeP's
    four classes: scored nucleus vs background, the ground truth's classes merged and said so (it
    had been refused: 'evaluate with a model trained on the same classes')."""
    from napari_medseg.evaluation.report import evaluate_maps

    gt = copy_small_consep(consep, tmp_path / "gt")
    pred = _prediction_folder(gt, tmp_path / "pred")
    (pred / "classes.json").write_text('{"classes": ["background", "nucleus"]}')
    for path in (pred / "labels").glob("*.tif"):
        tifffile.imwrite(path, (read_label_map(path) > 0).astype(np.uint8))
    report = evaluate_folders(pred, gt)
    assert report["classes_merged"] and "ground truth's classes" in report["note"]
    assert report["classes"] == ["background", "nucleus"] and list(report["per_class"]) == ["background", "nucleus"]
    stem = sorted(p.stem for p in (gt / "labels").glob("*.tif"))[0]
    truth = (read_label_map(gt / "labels" / f"{stem}.tif") > 0).astype(np.uint8)
    alone = evaluate_maps(truth, read_label_map(pred / "labels" / f"{stem}.tif"), ["background", "nucleus"],
                          gt_instances=read_label_map(gt / "instances" / f"{stem}.tif"),
                          pred_instances=read_label_map(pred / "instances" / f"{stem}.tif"))
    assert report["per_image"][stem]["bpq"] == pytest.approx(alone["overall"]["bpq"], abs=1e-12)


def test_a_nucleus_only_prediction_is_compared_with_classed_ground_truth(consep):
    from napari_medseg.evaluation.ground_truth import GroundTruth, compare_to_ground_truth
    from napari_medseg.evaluation.report import evaluate_maps

    classes = json.loads((consep / "classes.json").read_text())["classes"]
    class_map = read_label_map(consep / "labels" / "train_19_005.tif")
    instances = read_label_map(consep / "instances" / "train_19_005.tif")
    binary = (np.roll(class_map, 3, axis=1) > 0).astype(np.uint8)
    report = compare_to_ground_truth(binary, ["background", "nucleus"], GroundTruth(class_map, classes, instances))
    expected = evaluate_maps((class_map > 0).astype(np.uint8), binary, ["background", "nucleus"], gt_instances=instances)
    assert report["overall"]["nucleus_dice"] == pytest.approx(expected["overall"]["nucleus_dice"], abs=1e-12)
    assert report["overall"]["bpq"] == pytest.approx(expected["overall"]["bpq"], abs=1e-12)
    assert "merged into 'nucleus'" in report["note"]
