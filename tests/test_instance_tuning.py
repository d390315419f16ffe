"""evaluation.instance_tuning (benchmarks/tune_instances.py): the watershed re-run on kept model
outputs scores what the product's own path scores, and the weakest set decides."""

from __future__ import annotations

import pytest

from napari_medseg.evaluation.benchmark import evaluate_segmenter
from napari_medseg.evaluation.instance_tuning import binary_pq, model_outputs, settings_grid, weakest_set_best
from napari_medseg.evaluation.threshold import samples_of_groups
from napari_medseg.nuclei.watershed import InstanceSettings


def test_scores_from_kept_outputs_equal_the_segmenters_own_for_every_setting(consep):
    from napari_medseg.inference import Segmenter

    classes, samples = samples_of_groups(consep, ["train_12"])
    samples = samples[5:7]  # two real 256² patches with many touching nuclei
    segmenter = Segmenter.load("default", device="cpu", backend="torch")
    outputs = model_outputs(segmenter, samples)
    assert outputs[0].distance is not None and outputs[0].class_map.shape == samples[0].labels.shape
    scored = []
    for settings in (InstanceSettings(), InstanceSettings(marker_threshold=0.6, min_size=10, min_marker_size=4)):
        product, _ = evaluate_segmenter(segmenter, classes, samples, settings)
        assert binary_pq(outputs, settings) == pytest.approx(product["bpq"], abs=1e-9)
        scored.append(product["bpq"])
    assert 0.2 < min(scored) and scored[0] != scored[1]  # real nuclei found, and the settings matter


def test_the_grid_covers_every_combination_over_the_base():
    grid = settings_grid(InstanceSettings(sigma=2.0), marker_threshold=[0.3, 0.5], min_size=[10, 20, 30])
    assert len(grid) == 6 and all(s.sigma == 2.0 for s in grid)
    assert {(s.marker_threshold, s.min_size) for s in grid} == {(m, n) for m in (0.3, 0.5) for n in (10, 20, 30)}


def test_the_setting_whose_weakest_set_is_best_wins_and_the_mean_breaks_ties():
    grid = settings_grid(marker_threshold=[0.3, 0.4, 0.5, 0.6])
    scores = [{"a": 0.70, "b": 0.30}, {"a": 0.50, "b": 0.40}, {"a": 0.45, "b": 0.41}, {"a": 0.60, "b": 0.41}]
    chosen, row = weakest_set_best(grid, scores)
    assert chosen.marker_threshold == 0.6 and row == scores[3]
