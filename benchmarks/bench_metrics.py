"""PQ speed and memory: our contingency-table method vs. one full-image mask per instance.

Instance maps are real CoNSeP annotations tiled to each size (ids kept unique), the
prediction is the same map shifted by 2 px with every 8th nucleus dropped.

    python benchmarks/bench_metrics.py            # prints a table; last line machine-readable
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "consep_train"
sys.path.insert(0, str(REPO / "src"))

from napari_medseg.evaluation.instance import match_instances
from napari_medseg.io import read_label_map  # noqa: E402


def tiled_instances(size: int) -> np.ndarray:
    stems = sorted(p.stem for p in (DATA / "instances").glob("*.tif"))
    tiles, offset, out = size // 256, 0, np.zeros((size, size), np.int32)
    for k in range(tiles * tiles):
        patch = read_label_map(DATA / "instances" / f"{stems[(k * 7) % len(stems)]}.tif").astype(np.int32)
        y, x = divmod(k, tiles)
        out[y * 256:(y + 1) * 256, x * 256:(x + 1) * 256] = np.where(patch > 0, patch + offset, 0)
        offset += int(patch.max()) + 1
    return out


def perturbed(gt: np.ndarray) -> np.ndarray:
    pred = np.roll(gt, 2, axis=1)
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, ids[::8])] = 0
    return pred


def per_instance_mask_pq(gt, pred, gt_ids=None):
    """The textbook method: a full-image boolean mask per instance, IoU with every overlapping prediction."""
    tp, iou_sum = 0, 0.0
    for g in (gt_ids if gt_ids is not None else np.unique(gt)[1:]):
        gm = gt == g
        for p in np.unique(pred[gm]):
            if p == 0:
                continue
            pm = pred == p
            iou = np.logical_and(gm, pm).sum() / np.logical_or(gm, pm).sum()
            if iou > 0.5:
                tp += 1
                iou_sum += iou
    return tp, iou_sum


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return float(np.median(times)), peak


def main() -> None:
    print(f"{'size':>6} {'nuclei':>7} {'ours ms':>9} {'ours MB':>8} {'masks ms':>10} {'masks MB':>9} {'speed-up':>9}")
    last = {}
    for size in (256, 1024, 2048, 4096):
        gt = tiled_instances(size)
        pred = perturbed(gt)
        ids = np.unique(gt)[1:]
        ours_s, ours_peak = timed(lambda: match_instances(gt, pred), 5 if size <= 2048 else 2)
        sample = ids if size <= 1024 else ids[:: max(1, len(ids) // 200)]
        ref_s, ref_peak = timed(lambda: per_instance_mask_pq(gt, pred, sample), 1)
        ref_s *= len(ids) / len(sample)  # extrapolated from a subsample at 2048/4096
        note = "" if size <= 1024 else f" (masks: {len(sample)} of {len(ids)} nuclei timed, extrapolated)"
        print(f"{size:>6} {len(ids):>7} {ours_s * 1e3:>9.1f} {ours_peak / 2**20:>8.1f} {ref_s * 1e3:>10.0f} "
              f"{ref_peak / 2**20:>9.1f} {ref_s / ours_s:>8.0f}x{note}")
        last[size] = (ours_s, ref_s)
    print(f"pq_ms_1024={last[1024][0] * 1e3:.1f} speedup_1024={last[1024][1] / last[1024][0]:.0f}")


if __name__ == "__main__":
    main()
