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
