"""Metrics against a slow, obviously-correct reference (torchmetrics-style testing).

The reference below counts with one boolean mask per class and plain Python arithmetic,
following the conventions in the docstring of ``napari_medseg.evaluation.semantic``; the fast code
(one bincount) must agree to 1e-9 on random and on real CoNSeP label maps.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest

from napari_medseg.evaluation.semantic import MetricsInputError, confusion_matrix, evaluate_pair, semantic_metrics

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
# Real patches from different source images; train_1_005 etc. are also used by other tests.
CONSEP_STEMS = ["train_1_005", "train_2_006", "train_3_005", "train_7_010", "train_12_003", "train_20_008"]


# --------------------------------------------------------------------------- reference


def div(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def nan_mean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def reference_metrics(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    """Per class with boolean masks; every count is a Python int, every ratio a Python float."""
    per_class = []
    for c in range(num_classes):
        g, p = gt == c, pred == c
        tp = int(np.count_nonzero(g & p))
        fp = int(np.count_nonzero(~g & p))
        fn = int(np.count_nonzero(g & ~p))
        per_class.append({
            "tp": tp, "fp": fp, "fn": fn,
            "gt_pixels": int(np.count_nonzero(g)), "pred_pixels": int(np.count_nonzero(p)),
            "iou": div(tp, tp + fp + fn), "dice": div(2 * tp, 2 * tp + fp + fn),
            "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
        })
    total = int(gt.size)
    correct = int(np.count_nonzero(gt == pred))
    g_fg, p_fg = gt > 0, pred > 0
    btp = int(np.count_nonzero(g_fg & p_fg))
    bfp = int(np.count_nonzero(~g_fg & p_fg))
    bfn = int(np.count_nonzero(g_fg & ~p_fg))
    return {
        "per_class": per_class,
        "pixel_accuracy": div(correct, total),
        "pixel_error": div(total - correct, total),
        "miou": nan_mean([m["iou"] for m in per_class[1:]]),
        "mean_dice": nan_mean([m["dice"] for m in per_class[1:]]),
        "nucleus_dice": div(2 * btp, 2 * btp + bfp + bfn),
        "nucleus_iou": div(btp, btp + bfp + bfn),
        "pixels": total,
    }


def brute_force_confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> list[list[int]]:
    """One pixel at a time, no numpy arithmetic at all."""
    counts = Counter(zip(gt.ravel().tolist(), pred.ravel().tolist()))
    return [[counts.get((i, j), 0) for j in range(num_classes)] for i in range(num_classes)]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9


def assert_matches_reference(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    names = [f"class{c}" for c in range(num_classes)]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 or empty means
        cm = confusion_matrix(gt, pred, num_classes)
        got = semantic_metrics(cm, names)
    assert cm.shape == (num_classes, num_classes) and cm.dtype == np.int64
    assert cm.tolist() == brute_force_confusion(gt, pred, num_classes)
    ref = reference_metrics(gt, pred, num_classes)
    for c, name in enumerate(names):
        for key, value in ref["per_class"][c].items():
            assert same(got["per_class"][name][key], value), (name, key, got["per_class"][name][key], value)
    for key in ("pixel_accuracy", "pixel_error", "miou", "mean_dice", "nucleus_dice", "nucleus_iou"):
        assert isinstance(got[key], float), key
        assert same(got[key], ref[key]), (key, got[key], ref[key])
    assert got["pixels"] == ref["pixels"]
    return got


# --------------------------------------------------------------------------- random maps


def random_pair(rng: np.random.Generator, shape: tuple, num_classes: int, present: list[int], agree: float):
    gt = rng.choice(present, size=shape).astype(rng.choice([np.uint8, np.int32, np.int64]))
    pred = gt.copy()
    flip = rng.random(shape) > agree
    pred[flip] = rng.choice(present, size=int(flip.sum()))
    return gt, pred


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (3, 17, 5)])
@pytest.mark.parametrize("num_classes", [1, 2, 5, 9])
def test_random_maps_match_reference(seed, shape, num_classes):
    rng = np.random.default_rng(seed * 1000 + num_classes)
    # A random subset of classes occurs at all, so some are absent from both maps.
    k = int(rng.integers(1, num_classes + 1))
    present = sorted(rng.choice(num_classes, size=k, replace=False).tolist())
    gt, pred = random_pair(rng, shape, num_classes, present, agree=float(rng.uniform(0.3, 0.95)))
    got = assert_matches_reference(gt, pred, num_classes)
    for c in set(range(num_classes)) - set(present):
        assert math.isnan(got["per_class"][f"class{c}"]["iou"])


def test_class_absent_from_ground_truth_but_predicted():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])
    got = assert_matches_reference(gt, pred, 4)
    two = got["per_class"]["class2"]
    assert two["iou"] == 0.0 and two["precision"] == 0.0 and math.isnan(two["recall"])
    assert math.isnan(got["per_class"]["class3"]["iou"])
    assert got["miou"] == pytest.approx((1.0 + 0.0) / 2)  # class 3 (absent everywhere) is skipped


def test_pooled_aggregation_equals_concatenation():
    rng = np.random.default_rng(42)
    pairs = [random_pair(rng, (int(rng.integers(5, 40)), 23), 5, [0, 1, 2, 4], 0.7) for _ in range(5)]
    pooled = sum(confusion_matrix(g, p, 5) for g, p in pairs)
    gt = np.concatenate([g.ravel().astype(np.int64) for g, _ in pairs])
    pred = np.concatenate([p.ravel().astype(np.int64) for _, p in pairs])
    assert pooled.tolist() == brute_force_confusion(gt, pred, 5)
    ref = reference_metrics(gt, pred, 5)
    got = semantic_metrics(pooled)
    for key in ("pixel_accuracy", "miou", "mean_dice", "nucleus_dice"):
        assert same(got[key], ref[key]), key


# --------------------------------------------------------------------------- real CoNSeP maps


@pytest.fixture(scope="module")
def consep_labels(consep):
    from napari_medseg.io import read_label_map

    maps = [read_label_map(consep / "labels" / f"{stem}.tif") for stem in CONSEP_STEMS]
    for m in maps:
        assert m.shape == (256, 256) and m.max() < len(CONSEP_CLASSES)
    return maps


def perturbations(gt: np.ndarray):
    from skimage.morphology import dilation, disk, erosion

    yield "identity", gt.copy()
    yield "shift", np.roll(gt, (3, -5), axis=(0, 1))
    # Erode each nucleus class separately (a class map is not a grey image), background fills in.
    eroded = np.zeros_like(gt)
    for c in range(1, len(CONSEP_CLASSES)):
        eroded[erosion(gt == c, disk(2))] = c
    yield "eroded", eroded
    yield "dilated", dilation(gt, disk(2))
    rng = np.random.default_rng(int(gt.sum()))
    noisy = gt.copy()
    flip = rng.random(gt.shape) < 0.05
    noisy[flip] = rng.integers(0, len(CONSEP_CLASSES), int(flip.sum()))
    yield "noisy", noisy
    yield "all_background", np.zeros_like(gt)


def test_real_consep_maps_match_reference(consep_labels):
    seen_classes = set()
    for gt in consep_labels:
        seen_classes |= set(np.unique(gt).tolist())
        for name, pred in perturbations(gt):
            got = assert_matches_reference(gt, pred, len(CONSEP_CLASSES))
            if name == "identity":
                assert got["pixel_accuracy"] == 1.0
                assert got["nucleus_dice"] == 1.0 or gt.max() == 0
            if name == "all_background" and gt.max() > 0:
                assert got["nucleus_dice"] == 0.0 and got["miou"] == 0.0
            # The metrics are about the real thing: a shift or erosion costs overlap.
            if name in ("shift", "eroded") and gt.max() > 0:
                assert got["nucleus_dice"] < 1.0
    assert len(seen_classes) >= 4  # the sample covers most CoNSeP classes


def test_real_consep_pooled_over_images(consep_labels):
    from skimage.morphology import disk, erosion

    cms, gts, preds = [], [], []
    for gt in consep_labels:
        pred = np.zeros_like(gt)
        for c in range(1, len(CONSEP_CLASSES)):
            pred[erosion(gt == c, disk(1))] = c
        cms.append(confusion_matrix(gt, pred, 5))
        gts.append(gt.ravel())
        preds.append(pred.ravel())
    got = semantic_metrics(sum(cms), CONSEP_CLASSES)
    ref = reference_metrics(np.concatenate(gts), np.concatenate(preds), 5)
    for key in ("pixel_accuracy", "miou", "mean_dice", "nucleus_dice", "nucleus_iou"):
        assert same(got[key], ref[key]), key
    # Erosion never invents nucleus pixels: precision is perfect wherever it is defined.
    for name in CONSEP_CLASSES[1:]:
        assert got["per_class"][name]["fp"] == 0


def test_evaluate_pair_uses_class_names(consep_labels):
    gt = consep_labels[0]
    got = evaluate_pair(gt, np.roll(gt, 2, axis=0), CONSEP_CLASSES)
    assert list(got["per_class"]) == CONSEP_CLASSES
    ref = reference_metrics(gt, np.roll(gt, 2, axis=0), 5)
    assert same(got["miou"], ref["miou"])


# --------------------------------------------------------------------------- bad input and edge cases


def test_shape_mismatch_is_refused():
    with pytest.raises(MetricsInputError, match=r"\(4, 5\).*\(5, 4\)"):
        confusion_matrix(np.zeros((4, 5), int), np.zeros((5, 4), int), 2)


@pytest.mark.parametrize("bad", [5, 200])
def test_ids_beyond_class_count_are_refused(bad):
    gt = np.zeros((3, 3), np.uint8)
    pred = gt.copy()
    pred[1, 1] = bad
    with pytest.raises(MetricsInputError, match=rf"prediction holds class id {bad}, outside 0..4 for 5 classes"):
        confusion_matrix(gt, pred, 5)
    with pytest.raises(MetricsInputError, match=rf"ground truth holds class id {bad}"):
        confusion_matrix(pred, gt, 5)


def test_negative_ids_are_refused():
    gt = np.zeros((3, 3), np.int32)
    gt[0, 0] = -1
    with pytest.raises(MetricsInputError, match="class id -1"):
        confusion_matrix(gt, np.zeros((3, 3), np.int32), 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bool])
def test_non_integer_labels_are_refused(dtype):
    with pytest.raises(MetricsInputError, match="integer class ids"):
        confusion_matrix(np.zeros((3, 3), dtype), np.zeros((3, 3), np.uint8), 2)
    with pytest.raises(MetricsInputError, match="prediction must hold integer class ids"):
        confusion_matrix(np.zeros((3, 3), np.uint8), np.zeros((3, 3), dtype), 2)


def test_class_name_count_must_match_matrix():
    with pytest.raises(MetricsInputError, match="2 class names for a 3x3"):
        semantic_metrics(np.eye(3, dtype=int), ["a", "b"])


def test_all_background_ground_truth_is_nan_where_undefined():
    gt = np.zeros((8, 8), np.uint8)
    got = assert_matches_reference(gt, gt.copy(), 3)
    assert got["pixel_accuracy"] == 1.0 and got["pixel_error"] == 0.0
    for key in ("miou", "mean_dice", "nucleus_dice", "nucleus_iou"):
        assert math.isnan(got[key]), key
    pred = gt.copy()
    pred[0, :4] = 2  # false positives only
    got = assert_matches_reference(gt, pred, 3)
    assert got["per_class"]["class2"]["iou"] == 0.0 and math.isnan(got["per_class"]["class2"]["recall"])
    assert got["miou"] == 0.0 and got["nucleus_dice"] == 0.0


def test_empty_maps_give_nan_without_warnings():
    empty = np.zeros((0, 0), np.uint8)
    got = assert_matches_reference(empty, empty, 5)
    assert got["pixels"] == 0
    for key in ("pixel_accuracy", "pixel_error", "miou", "mean_dice", "nucleus_dice", "nucleus_iou"):
        assert math.isnan(got[key]), key
    for name, metrics in got["per_class"].items():
        assert metrics["tp"] == metrics["fp"] == metrics["fn"] == 0
        assert all(math.isnan(metrics[k]) for k in ("iou", "dice", "precision", "recall")), name
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        assert math.isnan(semantic_metrics(np.zeros((5, 5), np.int64))["miou"])
