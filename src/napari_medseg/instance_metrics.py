"""Instance metrics for nuclei: PQ = DQ x SQ (Kirillov et al.), bPQ / mPQ (PanNuke),
mPQ+ (CoNIC), detection F1 at IoU > 0.5, and AJI (Kumar et al.).

Everything comes from one contingency table per image: the pixel counts of every
(ground-truth id, predicted id) pair, from a single ``np.bincount`` after both maps are
relabelled 1..N. No full-image mask is ever made per instance. Each image and class
keeps ``(tp, fp, fn, iou_sum)`` so every aggregation is a cheap reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .instances import instance_classes
from .metrics import MetricsInputError


@dataclass
class PQCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: "PQCounts") -> "PQCounts":
        return PQCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def dq(self) -> float:
        """Detection quality = detection F1 at IoU > 0.5; NaN with no instance on either side."""
        den = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.tp / den if den else math.nan

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of matched pairs; NaN without matches."""
        return self.iou_sum / self.tp if self.tp else math.nan

    @property
    def pq(self) -> float:
        den = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.iou_sum / den if den else math.nan


def _check_instances(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise MetricsInputError(f"Ground-truth instances {gt.shape} and predicted instances {pred.shape} differ in shape.")
    for name, arr in (("ground-truth", gt), ("predicted", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise MetricsInputError(f"The {name} instance map must hold integer ids, not {arr.dtype}.")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise MetricsInputError(f"The {name} instance map holds negative ids.")
    return gt, pred


def _relabel(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids -> 0..N (0 stays background); works for any id size, 2**32 and beyond."""
    ids = np.asarray(ids)
    top = int(ids.max(initial=0))
    if top < 2**31 and top <= 4 * ids.size + 1024:
        # a lookup table is much faster than sorting (np.unique) for ordinary label maps
        present = np.bincount(ids.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)
        lut[~present] = 0
        return lut[ids], int(lut[-1]) if top else 0
    uniq, inverse = np.unique(ids, return_inverse=True)
    if uniq.size and uniq[0] == 0:
        return inverse.reshape(ids.shape), uniq.size - 1
    return (inverse + 1).reshape(ids.shape), uniq.size


DENSE_TABLE_LIMIT = 16_000_000  # cells of a dense (gt id x pred id) table: 128 MB of int64 at most


def _compact(table_areas: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop ids with no pixels; map raw 0-based indices to positions among the present ids."""
    present = table_areas > 0
    position = np.cumsum(present) - 1
    return table_areas[present], position[indices]


def _pairs(gt: np.ndarray, pred: np.ndarray):
    """(gt areas, pred areas, overlapping pairs: gt index, pred index, pixel count); 0-based
    indices into the area arrays, which list only ids that occur."""
    g_top, p_top = int(gt.max(initial=0)), int(pred.max(initial=0))
    if (g_top + 1) * (p_top + 1) > DENSE_TABLE_LIMIT:  # sparse or huge ids: make them 1..N first
        gt, g_top = _relabel(gt)
        pred, p_top = _relabel(pred)
    width = p_top + 1
    if (g_top + 1) * width <= DENSE_TABLE_LIMIT:
        # one bincount of paired ids gives the whole contingency table, areas included
        codes = gt.ravel().astype(np.int64) * width + pred.ravel()
        table = np.bincount(codes, minlength=(g_top + 1) * width).reshape(g_top + 1, width)
        inter = table[1:, 1:]
        gi, pi = np.nonzero(inter)
        counts = inter[gi, pi]
        area_g, gi = _compact(table[1:].sum(1), gi)
        area_p, pi = _compact(table[:, 1:].sum(0), pi)
        return area_g, area_p, gi, pi, counts
    # very many instances: count only the pairs that occur
    g, p = gt.ravel(), pred.ravel()
    area_g = np.bincount(g, minlength=g_top + 1)[1:]
    area_p = np.bincount(p, minlength=p_top + 1)[1:]
    both = (g > 0) & (p > 0)
    pairs, counts = np.unique((g[both] - 1).astype(np.int64) * p_top + (p[both] - 1), return_counts=True)
    return area_g, area_p, pairs // p_top, pairs % p_top, counts


def _iou_table(gt: np.ndarray, pred: np.ndarray):
    area_g, area_p, gi, pi, counts = _pairs(gt, pred)
    overlap = counts.astype(np.float64)
    union = area_g[gi] + area_p[pi] - overlap
    return area_g, area_p, gi, pi, overlap, union


def match_instances(gt_instances: np.ndarray, pred_instances: np.ndarray, iou_threshold: float = 0.5) -> PQCounts:
    """Unique matches at IoU > threshold (> 0.5 makes matches unique, as in the PQ paper)."""
    gt, pred = _check_instances(gt_instances, pred_instances)
    area_g, area_p, gi, pi, overlap, union = _iou_table(gt, pred)
    iou = overlap / union
    matched = iou > iou_threshold
    if iou_threshold < 0.5:  # not unique any more: keep each instance's best pair only
        order = np.argsort(-iou)
        used_g, used_p, keep = set(), set(), np.zeros_like(matched)
        for k in order[matched[order]]:
            if gi[k] not in used_g and pi[k] not in used_p:
                used_g.add(gi[k]), used_p.add(pi[k])
                keep[k] = True
        matched = keep
    tp = int(matched.sum())
    return PQCounts(tp, int(area_p.size - tp), int(area_g.size - tp), float(iou[matched].sum()))


def aji_parts(gt_instances: np.ndarray, pred_instances: np.ndarray) -> tuple[int, int]:
    """(sum of intersections, sum of unions) of the AJI, as HoVer-Net's ``get_fast_aji``:
    each ground-truth nucleus pairs with the prediction of highest IoU (if any overlaps);
    unpaired nuclei on both sides add their areas to the union."""
    gt, pred = _check_instances(gt_instances, pred_instances)
    area_g, area_p, gi, pi, overlap, union = _iou_table(gt, pred)
    if gi.size == 0:
        return 0, int(area_g.sum() + area_p.sum())
    iou = overlap / union
    # best prediction per gt: sort by (gt, -iou, pred) and take the first of each gt
    order = np.lexsort((pi, -iou, gi))
    first = order[np.r_[True, gi[order][1:] != gi[order][:-1]]]
    inter_sum = int(overlap[first].sum())
    union_sum = int(union[first].sum())
    paired_g = np.zeros(area_g.size, bool)
    paired_g[gi[first]] = True
    paired_p = np.zeros(area_p.size, bool)
    paired_p[pi[first]] = True
    union_sum += int(area_g[~paired_g].sum() + area_p[~paired_p].sum())
    return inter_sum, union_sum


def _class_instances(instances: np.ndarray, class_map: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Instance map of each class (instances assigned by majority vote), index 0 unused."""
    votes = instance_classes(instances, class_map)
    per_pixel = votes[instances]
    return [None] + [np.where(per_pixel == c, instances, 0) for c in range(1, num_classes)]


@dataclass
class ImageInstanceStats:
    binary: PQCounts
    per_class: list[PQCounts]  # index = class id; index 0 (background) unused
    aji_inter: int
    aji_union: int
    gt_classes_present: list[int] = field(default_factory=list)


def image_instance_stats(gt_instances: np.ndarray, gt_class_map: np.ndarray, pred_instances: np.ndarray,
                         pred_class_map: np.ndarray, num_classes: int) -> ImageInstanceStats:
    gt, pred = _check_instances(gt_instances, pred_instances)
    if gt_class_map.shape != gt.shape or pred_class_map.shape != pred.shape:
        raise MetricsInputError("Class maps and instance maps must have the same shape.")
    gt_small, _ = _relabel(gt)
    pred_small, _ = _relabel(pred)
    binary = match_instances(gt_small, pred_small)
    inter, union = aji_parts(gt_small, pred_small)
    gt_by_class = _class_instances(gt_small, np.asarray(gt_class_map), num_classes)
    pred_by_class = _class_instances(pred_small, np.asarray(pred_class_map), num_classes)
    per_class = [PQCounts()]
    present = []
    for c in range(1, num_classes):
        per_class.append(match_instances(gt_by_class[c], pred_by_class[c]))
        if gt_by_class[c].any():
            present.append(c)
    return ImageInstanceStats(binary, per_class, inter, union, present)


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def aggregate_instance_stats(stats: list[ImageInstanceStats], class_names: list[str]) -> dict:
    """bPQ, mPQ (PanNuke), mPQ+ (CoNIC), F1, AJI and per-class numbers; see ``aggregation``."""
    n = len(class_names)
    bpq_per_image = [s.binary.pq for s in stats if s.binary.tp + s.binary.fn > 0]  # images with nuclei
    mpq_per_image = []
    class_pq_per_image: list[list[float]] = [[] for _ in range(n)]
    for s in stats:
        values = []
        for c in s.gt_classes_present:
            values.append(s.per_class[c].pq)
            class_pq_per_image[c].append(s.per_class[c].pq)
        if values:
            mpq_per_image.append(_nanmean(values))
    pooled = [sum((s.per_class[c] for s in stats), PQCounts()) for c in range(n)]
    binary = sum((s.binary for s in stats), PQCounts())
    inter = sum(s.aji_inter for s in stats)
    union = sum(s.aji_union for s in stats)
    per_class = {}
    for c in range(1, n):
        per_class[class_names[c]] = {
            "pq": _nanmean(class_pq_per_image[c]), "pq_plus": pooled[c].pq, "f1": pooled[c].dq,
            "sq": pooled[c].sq, "tp": pooled[c].tp, "fp": pooled[c].fp, "fn": pooled[c].fn,
        }
    plus_values = [pooled[c].pq for c in range(1, n) if pooled[c].tp + pooled[c].fn > 0]
    return {
        "bpq": _nanmean(bpq_per_image),
        "mpq": _nanmean(mpq_per_image),
        "mpq_plus": _nanmean(plus_values),
        "f1": binary.dq,
        "aji": inter / union if union else math.nan,
        "binary": {"tp": binary.tp, "fp": binary.fp, "fn": binary.fn, "sq": binary.sq, "pq": binary.pq},
        "per_class": per_class,
        "aggregation": {
            "bpq": "per image binary PQ (images without ground-truth nuclei skipped), averaged over images",
            "mpq": "per image, PQ of each class present in its ground truth, averaged over classes, then images",
            "per_class.pq": "PQ of the class averaged over the images whose ground truth has it (PanNuke)",
            "mpq_plus": "per class tp/fp/fn/IoU summed over images, PQ per class, averaged over classes "
                        "present in the ground truth (CoNIC)",
            "f1": "binary detection F1 at IoU > 0.5, pooled",
            "aji": "sum of intersections / sum of unions over all images",
        },
    }
