"""evaluation.benchmark (benchmarks/accuracy.py) scores a model on data with other classes only where that is sound."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_medseg.evaluation.benchmark import evaluate_segmenter, scores_nuclei_only
from napari_medseg.evaluation.threshold import samples_of_groups


def test_a_classifying_model_is_scored_as_nuclei_on_single_class_data(monuseg):
    from napari_medseg.evaluation.report import PairEvaluation
    from napari_medseg.inference import Segmenter
    from napari_medseg.nuclei.watershed import InstanceSettings
    from napari_medseg.io.dataset import DatasetError

    classes, samples = samples_of_groups(monuseg, None)
    assert classes == ["background", "nucleus"] and len(samples) == 13
    s = samples[0]
    crop = SimpleNamespace(stem=s.stem, image=s.image[:256, :256], labels=s.labels[:256, :256],
                           instances=s.instances[:256, :256])
    segmenter = Segmenter.load("default", device="cpu")
    summary, _ = evaluate_segmenter(segmenter, classes, [crop])

    # by hand: every predicted class is a nucleus, instances as the model makes them
    pred, pred_instances = segmenter.segment_nuclei(crop.image, instance_settings=InstanceSettings())
    by_hand = PairEvaluation(classes, InstanceSettings())
    by_hand.add(crop.stem, crop.labels, (pred > 0).astype(np.uint8), crop.instances, pred_instances)
    overall = by_hand.report()["overall"]
    assert summary["nucleus_dice"] == pytest.approx(overall["nucleus_dice"]) and summary["bpq"] == pytest.approx(overall["bpq"])
    assert 0.3 < summary["nucleus_dice"] < 1  # the nuclei are found at all (merged classes, not class 1 only)

    with pytest.raises(DatasetError, match="differ from the data's"):
        scores_nuclei_only(segmenter.classes, ["background", "a", "b"])


def _accuracy_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipping_rule_wants_both_numbers_above_every_other_row_on_every_set():
    ship_rule = _accuracy_script().ship_rule

    def row(dice, bpq):
        return {"nucleus_dice": dice, "bpq": bpq}

    per_set = {"consep": {"old": row(0.77, 0.32), "new": row(0.78, 0.33), "baseline": row(0.63, 0.19)},
               "monuseg": {"old": row(0.71, 0.35), "new": row(0.76, 0.40), "baseline": row(0.74, 0.33)}}
    against = ["old", "baseline"]
    assert ship_rule(per_set, "new", against) == []
    per_set["consep"]["new"] = row(0.76, 0.34)  # better nuclei, a little less nucleus area: not shipped
    assert ship_rule(per_set, "new", against) == ["consep"]
    per_set["monuseg"]["baseline"] = row(0.77, 0.30)  # the baseline's Dice alone is enough to refuse
    assert ship_rule(per_set, "new", against) == ["consep", "monuseg"]
    assert ship_rule({"tie": {"old": row(0.7, 0.3), "new": row(0.7, 0.31)}}, "new", against) == ["tie"]
    # another candidate in the table is no reason to refuse: only the default and the baseline count
    assert ship_rule({"s": {"old": row(0.7, 0.3), "other": row(0.9, 0.5), "new": row(0.8, 0.4)}}, "new", against) == []


def test_the_sets_a_checkpoint_trained_on_come_from_its_config():
    trained_sets = _accuracy_script().trained_sets
    mixed = SimpleNamespace(training={"config": {"data": {"datasets": [
        {"path": "../shared/data/consep_train"}, {"path": "/data/tnbc_train"}], "dataset": []}}})
    single = SimpleNamespace(training={"config": {"data": {"dataset": ["../shared/data/consep_train"]}}})
    assert trained_sets(mixed) == {"consep_train", "tnbc_train"}
    assert trained_sets(single) == {"consep_train"} and trained_sets(SimpleNamespace(training={})) == set()


def test_a_model_that_trained_on_the_splits_held_out_images_is_named():
    """A fine-tune split with another seed trains on its start's held-out images: measured on them,
    it would look better than it is; the table says so."""
    from napari_medseg.models import read_meta, resolve_model_path

    trained_on_held_out = _accuracy_script().trained_on_held_out
    default = read_meta(resolve_model_path("default"))
    consep = [g for g in default.data["val_groups"] if g.startswith("consep_train/")]
    assert len(consep) == 4 and trained_on_held_out(default, consep) == []  # its own split
    other_split = SimpleNamespace(data={"val_groups": ["consep_train/train_2", "consep_train/train_6",
                                                       "consep_train/train_12"]})
    assert trained_on_held_out(other_split, consep) == [g for g in consep if g != "consep_train/train_12"]
    assert trained_on_held_out(SimpleNamespace(data={}), consep) == []  # no split recorded: cannot be told
