"""Fast instance metrics against slow, obviously-correct references (per-instance masks, loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk
from skimage.morphology import binary_dilation, binary_erosion
from skimage.morphology import disk as selem

from napari_medseg.evaluation.instance import PQCounts, aggregate_instance_stats, aji_parts, image_instance_stats, match_instances
from napari_medseg.nuclei.watershed import InstanceSettings, semantic_to_instances
from napari_medseg.nuclei.votes import classify_instances, instance_classes
from napari_medseg.io import read_label_map
from napari_medseg.evaluation.semantic import MetricsInputError

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


# -- slow references -------------------------------------------------------------------------
def ref_match(gt, pred):
    tp, iou_sum, matched_p = 0, 0.0, set()
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    for g in g_ids:
        gm = gt == g
        for p in p_ids:
            pm = pred == p
            inter = np.logical_and(gm, pm).sum()
            if inter == 0:
                continue
            iou = inter / np.logical_or(gm, pm).sum()
            if iou > 0.5:
                tp += 1
                iou_sum += iou
                matched_p.add(p)
    return PQCounts(tp, len(p_ids) - tp, len(g_ids) - tp, iou_sum)


def ref_aji(gt, pred):
    inter_sum = union_sum = 0
    used = set()
    p_ids = [i for i in np.unique(pred) if i]
    for g in [i for i in np.unique(gt) if i]:
        gm = gt == g
        best, best_iou = None, 0.0
        for p in p_ids:  # ascending ids: the first of equal IoUs wins, as np.argmax does
            pm = pred == p
            inter = np.logical_and(gm, pm).sum()
            if inter == 0:
                continue
            iou = inter / np.logical_or(gm, pm).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            union_sum += gm.sum()
        else:
            pm = pred == best
            inter_sum += np.logical_and(gm, pm).sum()
            union_sum += np.logical_or(gm, pm).sum()
            used.add(best)
    for p in p_ids:
        if p not in used:
            union_sum += (pred == p).sum()
    return int(inter_sum), int(union_sum)


def ref_majority(instances, class_map):
    out = {}
    for i in np.unique(instances):
        if i == 0:
            continue
        values = class_map[(instances == i) & (class_map > 0)]
        if values.size == 0:
            out[i] = 0
            continue
        counts = np.bincount(values)
        out[i] = int(np.flatnonzero(counts == counts.max())[0])
    return out


def assert_counts(a: PQCounts, b: PQCounts):
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn)
    assert a.iou_sum == pytest.approx(b.iou_sum, abs=1e-9)


# -- data ------------------------------------------------------------------------------------
def random_instances(seed, shape=(96, 96), n=25):
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.int32)
    for i in range(1, n + 1):  # later discs overlap (cut into) earlier ones: touching nuclei
        rr, cc = disk((rng.integers(0, shape[0]), rng.integers(0, shape[1])), rng.integers(3, 9), shape=shape)
        out[rr, cc] = i
    return out


def perturb(instances, seed):
    rng = np.random.default_rng(seed)
    out = np.roll(instances, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).copy()
    ids = [i for i in np.unique(out) if i]
    for i in rng.choice(ids, size=max(1, len(ids) // 8), replace=False):
        out[out == i] = 0  # missed nuclei
    for i in rng.choice(ids, size=max(1, len(ids) // 8), replace=False):
        mask = out == i
        out[binary_dilation(mask, selem(2)) & (out == 0)] = i if rng.random() < 0.5 else 0
        if rng.random() < 0.5:
            out[mask & ~binary_erosion(mask, selem(1))] = 0
    a, b = rng.choice(ids, 2, replace=False)
    out[out == b] = a  # a merge
    return out


def real_pairs(consep, stems=("train_19_005", "train_1_003", "train_7_010")):
    for k, stem in enumerate(stems):
        gt = read_label_map(consep / "instances" / f"{stem}.tif").astype(np.int64)
        cm = read_label_map(consep / "labels" / f"{stem}.tif")
        yield gt, cm, perturb(gt, k)


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_matching_and_aji_match_reference_on_random_maps(seed):
    gt = random_instances(seed)
    pred = perturb(gt, seed + 100) if seed % 2 else random_instances(seed + 50)
    assert_counts(match_instances(gt, pred), ref_match(gt, pred))
    assert aji_parts(gt, pred) == ref_aji(gt, pred)


def test_matching_and_aji_match_reference_on_real_consep(consep):
    for gt, _, pred in real_pairs(consep):
        assert_counts(match_instances(gt, pred), ref_match(gt, pred))
        assert aji_parts(gt, pred) == ref_aji(gt, pred)


def test_majority_vote_matches_loop(consep):
    for gt, cm, pred in real_pairs(consep):
        noisy = cm.copy()
        rng = np.random.default_rng(0)
        flip = rng.random(cm.shape) < 0.2
        noisy[flip] = rng.integers(0, 5, flip.sum())
        votes = instance_classes(gt, noisy)
        for i, c in ref_majority(gt, noisy).items():
            assert votes[i] == c
        cleaned = classify_instances(gt, noisy)
        for i, c in ref_majority(gt, noisy).items():
            assert (cleaned[gt == i] == c).all()


def test_per_class_and_aggregations_match_reference(consep):
    stats, refs = [], []
    for k, (gt, cm, pred_inst) in enumerate(real_pairs(consep)):
        pred_cm = np.where(pred_inst > 0, np.roll(cm, 1, axis=0), 0)
        pred_cm[pred_inst > 0] = np.maximum(pred_cm[pred_inst > 0], 1)
        s = image_instance_stats(gt, cm, pred_inst, pred_cm, 5)
        stats.append(s)
        gv, pv = ref_majority(gt, cm), ref_majority(pred_inst, pred_cm)
        per_class = {}
        for c in range(1, 5):
            g_c = np.where(np.isin(gt, [i for i, v in gv.items() if v == c]), gt, 0)
            p_c = np.where(np.isin(pred_inst, [i for i, v in pv.items() if v == c]), pred_inst, 0)
            per_class[c] = (ref_match(g_c, p_c), bool(g_c.any()))
            assert_counts(s.per_class[c], per_class[c][0])
        refs.append((ref_match(gt, pred_inst), per_class, ref_aji(gt, pred_inst)))
        assert_counts(s.binary, refs[-1][0])
    agg = aggregate_instance_stats(stats, CLASSES)

    def pq(c: PQCounts):
        den = c.tp + 0.5 * (c.fp + c.fn)
        return c.iou_sum / den if den else math.nan

    bpq = np.mean([pq(b) for b, _, _ in refs])
    mpq = np.mean([np.nanmean([pq(pc[c][0]) for c in pc if pc[c][1]]) for _, pc, _ in refs])
    plus = []
    for c in range(1, 5):
        total = sum((pc[c][0] for _, pc, _ in refs), PQCounts())
        if total.tp + total.fn:
            plus.append(pq(total))
    aji = sum(a[0] for _, _, a in refs) / sum(a[1] for _, _, a in refs)
    assert agg["bpq"] == pytest.approx(bpq, abs=1e-9)
    assert agg["mpq"] == pytest.approx(mpq, abs=1e-9)
    assert agg["mpq_plus"] == pytest.approx(np.mean(plus), abs=1e-9)
    assert agg["aji"] == pytest.approx(aji, abs=1e-9)
    binary = sum((b for b, _, _ in refs), PQCounts())
    assert agg["f1"] == pytest.approx(binary.tp / (binary.tp + 0.5 * (binary.fp + binary.fn)), abs=1e-9)


def test_huge_ids_give_the_same_answer(consep):
    gt, _, pred = next(real_pairs(consep))
    huge = np.where(gt > 0, gt.astype(np.uint64) * np.uint64(2**33) + np.uint64(2**32), np.uint64(0))
    assert_counts(match_instances(huge, pred), match_instances(gt, pred))
    assert aji_parts(huge, pred) == aji_parts(gt, pred)


def test_empty_maps_are_defined_without_warnings():
    empty = np.zeros((32, 32), np.int32)
    one = empty.copy()
    one[4:10, 4:10] = 7
    with np.errstate(all="raise"):
        c = match_instances(empty, empty)
        assert (c.tp, c.fp, c.fn) == (0, 0, 0) and math.isnan(c.pq)
        c = match_instances(empty, one)
        assert c.fp == 1 and c.pq == 0.0
        assert aji_parts(empty, one) == (0, 36)
        s = image_instance_stats(empty, empty, one, (one > 0).astype(np.uint8), 2)
        agg = aggregate_instance_stats([s], ["background", "nucleus"])
        assert math.isnan(agg["bpq"])  # images without ground-truth nuclei are skipped
        assert agg["f1"] == 0.0 and agg["aji"] == 0.0


def test_bad_instance_input():
    a = np.zeros((8, 8), np.int32)
    with pytest.raises(MetricsInputError, match="differ in shape"):
        match_instances(a, np.zeros((8, 9), np.int32))
    with pytest.raises(MetricsInputError, match="integer ids"):
        match_instances(a.astype(float), a)
    with pytest.raises(MetricsInputError, match="negative"):
        match_instances(a - 1, a)


def test_semantic_to_instances_recovers_real_nuclei(consep):
    """Watershed on the ground-truth class map should find most annotated nuclei."""
    pqs, ratios = [], []
    for stem in ("train_19_005", "train_1_003", "train_7_010", "train_12_008"):
        gt = read_label_map(consep / "instances" / f"{stem}.tif")
        cm = read_label_map(consep / "labels" / f"{stem}.tif")
        inst = semantic_to_instances(cm, InstanceSettings())
        assert inst.dtype == np.int32
        c = match_instances(gt, inst)
        pqs.append(c.pq)
        ratios.append(len(np.unique(inst)) / len(np.unique(gt)))
    assert np.mean(pqs) > 0.6, pqs
    assert 0.6 < np.mean(ratios) < 1.4, ratios
    assert semantic_to_instances(np.zeros((16, 16), np.uint8)).max() == 0


def test_threshold_search_matches_brute_force(consep):
    from napari_medseg.evaluation.semantic import binary_confusion, threshold_search
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    pairs = []
    for stem in ("train_19_005", "train_1_003", "train_7_010"):
        gt = read_label_map(consep / "labels" / f"{stem}.tif") > 0
        prob = np.clip(ndi.gaussian_filter(gt.astype(float), 2) * 0.8 + rng.random(gt.shape) * 0.3, 0, 1)
        pairs.append((gt, prob))
    grid = np.round(np.arange(0.05, 1.0, 0.05), 2)
    result = threshold_search(pairs, thresholds=grid)
    brute = {}
    for t in grid:
        cm = sum(binary_confusion(g, p >= t - 1e-12, 0.5) for g, p in pairs)  # p >= t, as the search counts
        tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
        brute[t] = 2 * tp / (2 * tp + fp + fn)
    best = max(brute, key=brute.get)
    assert result["threshold"] == pytest.approx(best, abs=1e-9)
    assert result["dice"] == pytest.approx(brute[best], abs=1e-9)
    with pytest.raises(MetricsInputError, match=r"\[0, 1\]"):
        threshold_search([(pairs[0][0], pairs[0][1] * 2)])
