"""What became of each annotated nucleus, and what each predicted one is: the kinds of error behind
a low detection F1 (missed, merged, split nuclei, false alarms) and a low SQ (loose outlines).

Every annotated nucleus is exactly one of

* ``found``: a predicted nucleus overlaps it with IoU > 0.5 (PQ's match);
* ``missed``: predicted nuclei cover less than ``COVERED`` of it;
* ``merged``: it lies mostly (over half) inside a predicted nucleus that holds most of another
  annotated nucleus too (two nuclei cut as one);
* ``outlined_badly``: anything else (found, but its outline overlaps the prediction's by IoU ≤ 0.5).

Every predicted nucleus not matched is one of

* ``false_alarm``: annotated nuclei cover less than ``COVERED`` of it;
* ``split``: it overlaps an annotated nucleus that another predicted nucleus matches (one cut as two);
* ``merge``: it holds most of two or more annotated nuclei (counted once, however many);
* ``outlined_badly``: anything else.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse.csgraph import connected_components

from .instance import _check_instances, _contingency, _matches

# share of a nucleus that must be overlapped for it to count as seen at all (missed / false alarm below)
COVERED = 0.2
# IoU above which a predicted nucleus is the annotated one (PQ's matching threshold)
MATCH_IOU = 0.5

TRUTH_KINDS = ("found", "missed", "merged", "outlined_badly")
PREDICTION_KINDS = ("matched", "false_alarm", "split", "merge", "outlined_badly")


def nucleus_error_kinds(truth: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, int]]:
    """``{"truth": {kind: count}, "predicted": {kind: count}}`` for two instance maps of one image
    (ids > 0 are nuclei, 0 background); see the module docstring for the kinds. Read off the
    overlap table PQ is computed from (``instance._contingency``)."""
    t = _contingency(*_check_instances(truth, predicted))
    n_t, n_p = t.area_g.size, t.area_p.size
    match = _matches(t, MATCH_IOU)[0]
    found = np.zeros(n_t, bool)
    found[t.gi[match]] = True
    matched = np.zeros(n_p, bool)
    matched[t.pi[match]] = True
    unseen_t = np.bincount(t.gi, weights=t.inter, minlength=n_t) < COVERED * t.area_g
    unseen_p = np.bincount(t.pi, weights=t.inter, minlength=n_p) < COVERED * t.area_p
    holds, merging = _merging(t)
    merged = np.zeros(n_t, bool)
    merged[t.gi[holds & merging[t.pi]]] = True
    # a predicted nucleus beside the match of a nucleus it overlaps cuts that nucleus in two
    beside_match = np.zeros(n_p, bool)
    beside_match[t.pi[found[t.gi]]] = True
    return {"truth": _first_kind(TRUTH_KINDS, [found, unseen_t, merged]),
            "predicted": _first_kind(PREDICTION_KINDS, [matched, unseen_p, beside_match & ~merging, merging])}


def _merging(t) -> tuple[np.ndarray, np.ndarray]:
    """(per overlapping pair: the predicted nucleus holds most of the annotated one, per predicted
    nucleus: it holds most of two or more, so merges them)."""
    holds = t.inter > 0.5 * t.area_g[t.gi]
    return holds, np.bincount(t.pi[holds], minlength=t.area_p.size) >= 2


def merges_by_contact(truth: np.ndarray, predicted: np.ndarray) -> dict[str, tuple[int, int]]:
    """``{"touching": (merges, nuclei), "separated": (merges, nuclei)}``: the predicted nuclei that
    merge annotated ones (module docstring), by what lies between those: a chain of nuclei each
    within a pixel of the next (diagonals included; only the seeds that split touching nuclei can
    part them), or annotated background between some of them (the foreground bridged a gap)."""
    t = _contingency(*_check_instances(truth, predicted))
    holds, merging = _merging(t)
    out = {"touching": (0, 0), "separated": (0, 0)}
    for p in np.flatnonzero(merging):
        ids = t.gt_ids[t.gi[holds & (t.pi == p)]]
        kind = "touching" if _one_chain(t.gt_map, ids) else "separated"
        out[kind] = (out[kind][0] + 1, out[kind][1] + ids.size)
    return out


def _one_chain(ids_map: np.ndarray, ids: np.ndarray) -> bool:
    """Whether the nuclei ``ids`` of ``ids_map`` are joined by touching, each within a pixel of the next."""
    rows, cols = np.nonzero(np.isin(ids_map, ids))
    crop = ids_map[max(rows.min() - 1, 0):rows.max() + 2, max(cols.min() - 1, 0):cols.max() + 2]
    position = {int(i): k for k, i in enumerate(ids)}
    near = np.eye(ids.size, dtype=bool)
    for i, k in position.items():
        around = ndi.binary_dilation(crop == i, np.ones((3, 3), bool))
        for other in np.unique(crop[around]):
            if int(other) in position:
                near[k, position[int(other)]] = True
    return connected_components(near, directed=False)[0] == 1


def _first_kind(kinds: tuple[str, ...], tests: list[np.ndarray]) -> dict[str, int]:
    """Counts per kind, each object taking the first of ``tests`` (in ``kinds``' order, the last
    kind being 'the rest') that holds for it."""
    left = np.ones(tests[0].size, bool)
    counts = {}
    for kind, test in zip(kinds, tests):
        counts[kind] = int((test & left).sum())
        left &= ~test
    counts[kinds[-1]] = int(left.sum())
    return counts


def add_error_kinds(total: dict | None, one: dict) -> dict:
    """The sum of two ``nucleus_error_kinds`` results (``total`` None: a copy of ``one``)."""
    if total is None:
        return {side: dict(counts) for side, counts in one.items()}
    for side, counts in one.items():
        for kind, n in counts.items():
            total[side][kind] += n
    return total
