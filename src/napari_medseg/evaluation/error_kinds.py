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

from ..nuclei.votes import check_ids

# share of a nucleus that must be overlapped for it to count as seen at all (missed / false alarm below)
COVERED = 0.2
# IoU above which a predicted nucleus is the annotated one (PQ's matching threshold)
MATCH_IOU = 0.5

TRUTH_KINDS = ("found", "missed", "merged", "outlined_badly")
PREDICTION_KINDS = ("matched", "false_alarm", "split", "merge", "outlined_badly")


def nucleus_error_kinds(truth: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, int]]:
    """``{"truth": {kind: count}, "predicted": {kind: count}}`` for two instance maps of one image
    (ids > 0 are nuclei, 0 background); see the module docstring for the kinds."""
    truth, predicted = check_ids("annotated instance map", truth), check_ids("predicted instance map", predicted)
    if truth.shape != predicted.shape:
        raise ValueError(f"The instance maps differ in shape: {truth.shape} and {predicted.shape}.")
    t_ids, t_area = np.unique(truth[truth > 0], return_counts=True)
    p_ids, p_area = np.unique(predicted[predicted > 0], return_counts=True)
    t_size, p_size = dict(zip(t_ids.tolist(), t_area.tolist())), dict(zip(p_ids.tolist(), p_area.tolist()))
    both = (truth > 0) & (predicted > 0)
    pairs, shared = np.unique(np.stack([truth[both], predicted[both]]), axis=1, return_counts=True) \
        if both.any() else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
    overlaps = [(int(t), int(p), int(n)) for (t, p), n in zip(pairs.T, shared)]
    matched_t, matched_p = set(), set()
    for t, p, n in overlaps:
        if n / (t_size[t] + p_size[p] - n) > MATCH_IOU:
            matched_t.add(t)
            matched_p.add(p)
    # the annotated nuclei most of which lie inside each predicted nucleus
    holds: dict[int, list[int]] = {}
    for t, p, n in overlaps:
        if n > 0.5 * t_size[t]:
            holds.setdefault(p, []).append(t)
    seen_t: dict[int, int] = {}
    seen_p: dict[int, int] = {}
    for t, p, n in overlaps:
        seen_t[t] = seen_t.get(t, 0) + n
        seen_p[p] = seen_p.get(p, 0) + n
    merging = {p for p, ts in holds.items() if len(ts) >= 2}
    merged_t = {t for p in merging for t in holds[p]}
    kinds_t = dict.fromkeys(TRUTH_KINDS, 0)
    for t in t_size:
        if t in matched_t:
            kinds_t["found"] += 1
        elif seen_t.get(t, 0) < COVERED * t_size[t]:
            kinds_t["missed"] += 1
        elif t in merged_t:
            kinds_t["merged"] += 1
        else:
            kinds_t["outlined_badly"] += 1
    partners: dict[int, list[int]] = {}
    for t, p, _n in overlaps:
        partners.setdefault(p, []).append(t)
    kinds_p = dict.fromkeys(PREDICTION_KINDS, 0)
    for p in p_size:
        if p in matched_p:
            kinds_p["matched"] += 1
        elif seen_p.get(p, 0) < COVERED * p_size[p]:
            kinds_p["false_alarm"] += 1
        elif p in merging:
            kinds_p["merge"] += 1
        elif any(t in matched_t for t in partners.get(p, [])):
            kinds_p["split"] += 1
        else:
            kinds_p["outlined_badly"] += 1
    return {"truth": kinds_t, "predicted": kinds_p}


def add_error_kinds(total: dict | None, one: dict) -> dict:
    """The sum of two ``nucleus_error_kinds`` results (``total`` None: a copy of ``one``)."""
    if total is None:
        return {side: dict(counts) for side, counts in one.items()}
    for side, counts in one.items():
        for kind, n in counts.items():
            total[side][kind] += n
    return total
