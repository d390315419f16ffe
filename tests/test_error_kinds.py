"""evaluation.error_kinds: each annotated nucleus found, missed, merged or outlined badly; each
predicted one matched, a false alarm, a split, a merge or outlined badly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.evaluation.error_kinds import add_error_kinds, merges_by_contact, nucleus_error_kinds


def test_each_kind_on_a_drawn_example():
    truth, pred = np.zeros((80, 80), np.int32), np.zeros((80, 80), np.int32)
    truth[5:15, 5:15], truth[5:15, 15:25] = 1, 2  # two touching nuclei...
    pred[5:15, 5:25] = 1  # ...cut as one
    truth[30:40, 30:40] = 3
    pred[30:40, 30:40] = 2  # found exactly
    truth[50:60, 50:60] = 4  # missed
    truth[30:40, 5:15] = 5
    pred[30:40, 5:11], pred[30:40, 11:15] = 3, 4  # split: 60% of it matches, the rest is a second nucleus
    pred[60:70, 5:15] = 5  # on background
    truth[65:75, 60:70] = 6
    pred[65:75, 63:73] = 6  # shifted: IoU 7/13, found
    truth[45:55, 20:30] = 7
    pred[43:59, 18:34] = 7  # too big: IoU 100/256, outlined badly
    kinds = nucleus_error_kinds(truth, pred)
    assert kinds["truth"] == {"found": 3, "missed": 1, "merged": 2, "outlined_badly": 1}
    assert kinds["predicted"] == {"matched": 3, "false_alarm": 1, "split": 1, "merge": 1, "outlined_badly": 1}


def test_real_nuclei_against_themselves_and_a_coarser_cut(consep):
    from napari_medseg.io.dataset import open_dataset
    from napari_medseg.nuclei.watershed import InstanceSettings, semantic_to_instances

    folder = open_dataset(consep, require_labels=True)
    total = None
    for stem in ("train_1_005", "train_12_003", "train_19_005"):
        sample = folder.load(stem)
        n = len(np.unique(sample.instances)) - 1
        same = nucleus_error_kinds(sample.instances, sample.instances)
        assert same["truth"]["found"] == n and same["predicted"]["matched"] == n
        # the class map's own watershed (no distance map): some touching nuclei merge
        cut = semantic_to_instances(sample.labels, InstanceSettings(min_size=10, min_distance=12))
        kinds = nucleus_error_kinds(sample.instances, cut)
        assert sum(kinds["truth"].values()) == n and sum(kinds["predicted"].values()) == len(np.unique(cut)) - 1
        total = add_error_kinds(total, kinds)
    assert total["truth"]["merged"] > 0 and total["truth"]["found"] > total["truth"]["merged"]


def test_merges_by_what_lies_between_the_merged_nuclei():
    truth, pred = np.zeros((60, 60), np.int32), np.zeros((60, 60), np.int32)
    truth[5:15, 5:15], truth[5:15, 15:25], truth[15:25, 24:30] = 1, 2, 3  # a chain: 1 touches 2, 2 touches 3 at a corner
    pred[5:25, 5:30] = 1
    truth[35:45, 5:15], truth[35:45, 17:27] = 4, 5  # two pixels of background between them
    pred[35:45, 5:27] = 2
    truth[35:45, 40:50], truth[45:55, 50:57] = 6, 7  # corner to corner, diagonal neighbours: touching
    pred[35:56, 40:58] = 3
    truth[20:30, 45:55] = 8
    pred[20:30, 45:55] = 4  # found, merges nothing
    assert merges_by_contact(truth, pred) == {"touching": (2, 5), "separated": (1, 2)}
    # the same with ids too large for a dense table (relabelled inside): the same answer
    big = np.where(truth > 0, truth.astype(np.int64) + 2**40, 0)
    assert merges_by_contact(big, pred) == {"touching": (2, 5), "separated": (1, 2)}


def test_maps_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        nucleus_error_kinds(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))
