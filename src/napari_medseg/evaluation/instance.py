"""Instance metrics for nuclei: PQ = DQ x SQ (Kirillov et al. 2019), bPQ / mPQ (PanNuke),
mPQ+ (CoNIC), detection F1 at IoU > 0.5, and AJI (Kumar et al. 2017).

Everything about one image comes from ONE contingency table: the pixel count of every
(ground-truth id, predicted id) pair, from a single ``np.bincount`` of paired ids (or, with
very many instances, one sort of the overlapping pairs). Ids are used as given when they are
small, else relabelled 1..N with ``skimage.segmentation.relabel_sequential`` first (ids of
2**32 and beyond work). Instances are always taken in ascending id order, so ties break the
same way as on relabelled maps. No full-image mask is ever made per instance.

Conventions, stated once:

* A match is a (gt, pred) pair with IoU > 0.5 (strictly, as in the PQ paper); such pairs are
  unique. TP = matches, FP = unmatched predictions, FN = unmatched ground-truth nuclei.
* ``PQCounts``: DQ = TP / (TP + FP/2 + FN/2) (the detection F1), SQ = IoU sum / TP,
  PQ = IoU sum / (TP + FP/2 + FN/2) (= DQ x SQ). No instance on either side -> DQ and PQ are
  NaN; no match -> SQ is NaN. (HoVer-Net/PanNuke add 1e-6 to denominators instead; the
  numbers differ from ours by ~1e-6 relative where both are defined.)
* AJI as HoVer-Net's ``get_fast_aji``: each gt nucleus is paired with the prediction of highest
  ``inter / (union + 1e-6)`` (ties -> lowest predicted id; a prediction may serve several gt
  nuclei); its intersection and union are summed; unpaired gt and unpaired predicted nuclei add
  their areas to the union. AJI = inter / union; NaN when both maps are empty.
* The class of an instance is the majority class of its pixels in its own class map
  (``instances.instance_classes``). Instances whose pixels are all background in the class
  map have no class: they count in the binary numbers but in no class. Class 0 (background)
  is never a nucleus class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..nuclei.votes import instance_classes, table_size_ok
from .semantic import MetricsInputError, check_label_pair

AJI_EPS = 1e-6  # as HoVer-Net's get_fast_aji: decides ties between equal IoUs (larger union wins)
DENSE_TABLE_LIMIT = 16_000_000  # cells of a dense (gt id x pred id) table: 128 MB of int64 at most


class InstanceMetricsInputError(MetricsInputError):
    """Instance maps (or their class maps) cannot be compared as given."""


@dataclass
class PQCounts:
    """Matching counts of one image (or class, or pooled): see the module docstring."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: "PQCounts") -> "PQCounts":
        if not isinstance(other, PQCounts):
            return NotImplemented
        return PQCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    def __radd__(self, other):  # sum(list_of_counts) starts from 0
        return self if other == 0 else NotImplemented

    @property
    def _den(self) -> float:
        return self.tp + 0.5 * self.fp + 0.5 * self.fn

    @property
    def dq(self) -> float:
        """Detection quality = detection F1 at IoU > 0.5; NaN with no instance on either side."""
        return self.tp / self._den if self._den else math.nan

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of the matched pairs; NaN without matches."""
        return self.iou_sum / self.tp if self.tp else math.nan

    @property
    def pq(self) -> float:
        """Panoptic quality = DQ x SQ; NaN with no instance on either side, 0 with no match."""
        return self.iou_sum / self._den if self._den else math.nan

    @property
    def f1(self) -> float:
        return self.dq


# -- the contingency table ---------------------------------------------------------------------
def _check_instances(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise InstanceMetricsInputError(
            f"Ground-truth instances {gt.shape} and predicted instances {pred.shape} differ in shape; they must match."
        )
    for name, arr in (("ground-truth", gt), ("predicted", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise InstanceMetricsInputError(f"The {name} instance map must hold integer ids, not {arr.dtype}.")
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise InstanceMetricsInputError(
                f"The {name} instance map holds negative ids (min {int(arr.min())}); ids must be >= 0."
            )
    # one signed index type for the tables' arithmetic: uint64 maps (a label TIFF of more than
    # 2**32 ids is written so) mixed with int64 codes failed in numpy's casting rules
    return _as_index(gt, "ground-truth"), _as_index(pred, "predicted")


def _as_index(ids: np.ndarray, name: str) -> np.ndarray:
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.intp).max:
        from skimage.segmentation import relabel_sequential

        ids = relabel_sequential(ids)[0]
    return ids.astype(np.intp, copy=False)


def _small_ids(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """``(ids, max id)`` with ids small enough to index tables: as given, or relabelled 1..N."""
    top = int(ids.max(initial=0))
    if not table_size_ok(top, ids.size):
        from skimage.segmentation import relabel_sequential

        ids = relabel_sequential(ids)[0]
        top = int(ids.max(initial=0))
    return ids, top


@dataclass
class _Table:
    """Contingency table of one image in sparse form; instance k = the k-th present id."""

    gt_map: np.ndarray  # the gt ids used (as given or relabelled), intp
    pred_map: np.ndarray
    gt_ids: np.ndarray  # present ids (ascending) in gt_map
    pred_ids: np.ndarray
    area_g: np.ndarray  # area of each gt instance (int64)
    area_p: np.ndarray
    gi: np.ndarray  # overlapping pairs: gt index, pred index (0-based), pixel count
    pi: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.area_g[self.gi] + self.area_p[self.pi] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union  # union >= inter > 0 for every listed pair


def _contingency(gt: np.ndarray, pred: np.ndarray) -> _Table:
    gt, g_top = _small_ids(gt)
    pred, p_top = _small_ids(pred)
    g, p = gt.ravel(), pred.ravel()
    width = p_top + 1
    if (g_top + 1) * width <= DENSE_TABLE_LIMIT:
        # one bincount of paired ids is the whole table, areas included (row/column sums);
        # the codes are built in place: one int64 copy of the ground truth, nothing else
        codes = g.astype(np.intp)
        codes *= width
        codes += p
        table = np.bincount(codes, minlength=(g_top + 1) * width).reshape(g_top + 1, width)
        area_g_all, area_p_all = table.sum(1), table.sum(0)
        gi, pi = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][gi, pi]
        gi, pi = gi + 1, pi + 1  # raw ids
    else:
        # very many instances: sort only the overlapping pixels' pairs (one np.unique)
        area_g_all = np.bincount(g, minlength=g_top + 1)
        area_p_all = np.bincount(p, minlength=p_top + 1)
        both = (g > 0) & (p > 0)
        codes, inter = np.unique(g[both].astype(np.intp) * width + p[both], return_counts=True)
        gi, pi = np.divmod(codes, width)
    gt_ids = np.flatnonzero(area_g_all[1:]) + 1
    pred_ids = np.flatnonzero(area_p_all[1:]) + 1
    # raw id -> position among present ids (ascending, as relabel_sequential would number them)
    g_pos = np.cumsum(area_g_all > 0) - 1 - (area_g_all[0] > 0)
    p_pos = np.cumsum(area_p_all > 0) - 1 - (area_p_all[0] > 0)
    return _Table(gt, pred, gt_ids, pred_ids, area_g_all[gt_ids].astype(np.int64),
                  area_p_all[pred_ids].astype(np.int64), g_pos[gi], p_pos[pi], inter.astype(np.int64))


def _matches(t: _Table, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(mask over the pairs that match, their IoUs)."""
    iou = t.iou
    return iou > iou_threshold, iou


def _counts(t: _Table, matched: np.ndarray, iou: np.ndarray) -> PQCounts:
    tp = int(matched.sum())
    return PQCounts(tp, int(t.area_p.size - tp), int(t.area_g.size - tp), float(iou[matched].sum()))


def _aji(t: _Table) -> tuple[int, int]:
    if t.gi.size == 0:
        return 0, int(t.area_g.sum() + t.area_p.sum())
    union = t.union
    score = t.inter / (union + AJI_EPS)
    # best prediction per gt nucleus: sort by (gt, -score, pred), take the first of each gt
    order = np.lexsort((t.pi, -score, t.gi))
    g_sorted = t.gi[order]
    first = order[np.r_[True, g_sorted[1:] != g_sorted[:-1]]]
    paired_g = np.zeros(t.area_g.size, bool)
    paired_g[t.gi[first]] = True
    paired_p = np.zeros(t.area_p.size, bool)
    paired_p[t.pi[first]] = True
    inter_sum = int(t.inter[first].sum())
    union_sum = int(union[first].sum()) + int(t.area_g[~paired_g].sum()) + int(t.area_p[~paired_p].sum())
    return inter_sum, union_sum


# -- public API ----------------------------------------------------------------------------------
def match_instances(gt_instances: np.ndarray, pred_instances: np.ndarray, iou_threshold: float = 0.5) -> PQCounts:
    """TP/FP/FN and the IoU sum of the matches (pairs with IoU > ``iou_threshold``).

    The threshold must be in [0.5, 1): from 0.5 up, matches are unique without any
    assignment step (PQ paper); lower thresholds would need one and are refused.
    """
    if not 0.5 <= iou_threshold < 1:
        raise InstanceMetricsInputError(f"iou_threshold must be in [0.5, 1) for unique matches, got {iou_threshold}.")
    t = _contingency(*_check_instances(gt_instances, pred_instances))
    return _counts(t, *_matches(t, iou_threshold))


def aji_parts(gt_instances: np.ndarray, pred_instances: np.ndarray) -> tuple[int, int]:
    """``(sum of intersections, sum of unions)`` of the AJI (see module docstring); AJI = inter / union."""
    return _aji(_contingency(*_check_instances(gt_instances, pred_instances)))


def aji(gt_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """Aggregated Jaccard index of one image; NaN when both maps are empty."""
    inter, union = aji_parts(gt_instances, pred_instances)
    return inter / union if union else math.nan


@dataclass
class ImageInstanceStats:
    """Everything the aggregations need from one image."""

    binary: PQCounts  # all nucleus classes merged
    per_class: list[PQCounts]  # index = class id; index 0 (background) is always empty
    aji_inter: int
    aji_union: int
    gt_classes_present: list[int] = field(default_factory=list)  # classes with >= 1 gt instance

    @property
    def aji(self) -> float:
        return self.aji_inter / self.aji_union if self.aji_union else math.nan


def image_instance_stats(gt_instances: np.ndarray, gt_class_map: np.ndarray, pred_instances: np.ndarray,
                         pred_class_map: np.ndarray, num_classes: int) -> ImageInstanceStats:
    """Binary and per-class PQ counts and AJI parts of one image, from one contingency table.

    The class of an instance is the majority vote of its own side's class map. Per class c,
    the gt instances of class c are matched against the predicted instances of class c, as
    PanNuke's per-class instance maps are; since instances never overlap within a map, this is
    the binary matching restricted to pairs whose two classes are both c.
    """
    gt, pred = _check_instances(gt_instances, pred_instances)
    gt_class_map, pred_class_map = check_label_pair(gt_class_map, pred_class_map, num_classes)
    if gt_class_map.shape != gt.shape:
        raise InstanceMetricsInputError(
            f"The class maps have shape {gt_class_map.shape} but the instance maps {gt.shape}; they must match."
        )
    t = _contingency(gt, pred)
    matched, iou = _matches(t)
    binary = _counts(t, matched, iou)
    inter, union = _aji(t)
    cls_g = instance_classes(t.gt_map, gt_class_map)[t.gt_ids]
    cls_p = instance_classes(t.pred_map, pred_class_map)[t.pred_ids]
    n_gt = np.bincount(cls_g, minlength=num_classes)
    n_pred = np.bincount(cls_p, minlength=num_classes)
    same = matched & (cls_g[t.gi] == cls_p[t.pi]) & (cls_g[t.gi] > 0)
    tp = np.bincount(cls_g[t.gi[same]], minlength=num_classes)
    iou_sum = np.bincount(cls_g[t.gi[same]], weights=iou[same], minlength=num_classes)
    per_class = [PQCounts()] + [
        PQCounts(int(tp[c]), int(n_pred[c] - tp[c]), int(n_gt[c] - tp[c]), float(iou_sum[c]))
        for c in range(1, num_classes)
    ]
    present = [c for c in range(1, num_classes) if n_gt[c] > 0]
    return ImageInstanceStats(binary, per_class, inter, union, present)


def _mean(values) -> float:
    """Mean of the defined (non-NaN) values; NaN when there are none (never a warning)."""
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


AGGREGATION = {
    "bpq": "PanNuke: binary PQ per image (images without ground-truth nuclei skipped), averaged over images",
    "mpq": "PanNuke: per image, PQ of each class present in its ground truth, averaged over those classes, "
           "then over images (images without ground-truth nuclei skipped; PanNuke's published numbers average "
           "the images of each tissue type, then the tissues: not done here)",
    "mpq_plus": "CoNIC: tp/fp/fn/IoU sum per class added over all images, PQ per class, averaged over classes "
                "(a class with no instance on either side in the whole data set is left out; CoNIC counts it 0)",
    "f1": "binary detection F1 at IoU > 0.5 from tp/fp/fn added over all images",
    "aji": "sum of intersections / sum of unions over all images",
    "per_class.pq": "PanNuke: PQ of the class averaged over the images whose ground truth has it",
    "per_class.pq_plus / f1 / sq / tp / fp / fn": "counts added over all images (CoNIC)",
}


def aggregate_instance_stats(stats: list[ImageInstanceStats], class_names: list[str]) -> dict:
    """bPQ, mPQ (PanNuke), mPQ+ (CoNIC), F1, AJI and per-class numbers (``aggregation`` says how).

    Undefined numbers are NaN: e.g. bPQ/mPQ when no image has ground-truth nuclei, F1 when
    there is no instance anywhere, a class's ``pq`` when no image's ground truth has it.
    """
    n = len(class_names)
    for s in stats:
        if len(s.per_class) != n:
            raise InstanceMetricsInputError(
                f"{len(class_names)} class names but image statistics for {len(s.per_class)} classes."
            )
    bpq = [s.binary.pq for s in stats if s.binary.tp + s.binary.fn > 0]
    mpq = []
    class_pq: list[list[float]] = [[] for _ in range(n)]
    for s in stats:
        values = [s.per_class[c].pq for c in s.gt_classes_present]
        for c, v in zip(s.gt_classes_present, values):
            class_pq[c].append(v)
        if values:
            mpq.append(_mean(values))
    pooled = [sum((s.per_class[c] for s in stats), PQCounts()) for c in range(n)]
    binary = sum((s.binary for s in stats), PQCounts())
    inter = sum(s.aji_inter for s in stats)
    union = sum(s.aji_union for s in stats)
    per_class = {
        class_names[c]: {
            "pq": _mean(class_pq[c]), "pq_plus": pooled[c].pq, "f1": pooled[c].dq, "sq": pooled[c].sq,
            "tp": pooled[c].tp, "fp": pooled[c].fp, "fn": pooled[c].fn, "gt_images": len(class_pq[c]),
        }
        for c in range(1, n)
    }
    return {
        "bpq": _mean(bpq),
        "mpq": _mean(mpq),
        "mpq_plus": _mean(pooled[c].pq for c in range(1, n)),
        "f1": binary.dq,
        "aji": inter / union if union else math.nan,
        "binary": {"tp": binary.tp, "fp": binary.fp, "fn": binary.fn, "sq": binary.sq, "pq": binary.pq},
        "per_class": per_class,
        "images": len(stats),
        "aggregation": dict(AGGREGATION),
    }
