"""Nucleus post-processing (``nuclei.watershed.InstanceSettings``) chosen by measurement
(``benchmarks/tune_instances.py``).

A model runs once per image; its class map and distance map are kept, and every candidate
setting re-runs only the watershed on them, as ``Segmenter.segment_nuclei`` would, and is scored
by binary PQ against the images' instance maps. Of several sets the setting that serves the
weakest best wins (the trainer's ``val_worst_set_bpq`` rule). Tune on training images: the
held-out ones then stay a fair check of the choice.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from ..nuclei.watershed import InstanceSettings, semantic_to_instances
from .instance import aggregate_instance_stats, image_instance_stats


@dataclass
class ModelOutput:
    """One labelled image with what the model made of it."""

    labels: np.ndarray  # ground-truth class map
    instances: np.ndarray  # ground-truth instance map
    class_map: np.ndarray  # predicted, uint8
    distance: np.ndarray | None  # the distance head's map (float16), None without one


def model_outputs(segmenter, samples, tiles=None) -> list[ModelOutput]:
    """The model's class and distance maps of every sample (``.image``, ``.labels``, ``.instances``),
    run with ``tiles`` (``TileSettings``; e.g. test-time flips)."""
    outputs = []
    for s in samples:
        distance = np.zeros(s.image.shape[:2], np.float32) if segmenter.has_distance_head else None
        class_map = segmenter.segment(s.image, tiles, distance_out=distance)
        outputs.append(ModelOutput(s.labels, s.instances, np.asarray(class_map, np.uint8),
                                   None if distance is None else distance.astype(np.float16)))
    return outputs


def binary_pq(outputs: list[ModelOutput], settings: InstanceSettings) -> float:
    """bPQ (PanNuke: per image, averaged) of the nuclei ``settings`` cut from the model's outputs."""
    stats = []
    for o in outputs:
        distance = None if o.distance is None else o.distance.astype(np.float32)
        found = semantic_to_instances(o.class_map, settings, distance)
        stats.append(image_instance_stats(o.instances, (o.labels > 0).astype(np.uint8), found,
                                          (o.class_map > 0).astype(np.uint8), 2))
    return aggregate_instance_stats(stats, ["background", "nucleus"])["bpq"]


def settings_grid(base: InstanceSettings | None = None, **values) -> list[InstanceSettings]:
    """Every combination of ``values`` (field name -> candidates) over ``base``."""
    base = base or InstanceSettings()
    names = list(values)
    return [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*(values[n] for n in names))]


def score_grid(outputs_per_set: dict[str, list[ModelOutput]], grid: list[InstanceSettings]) -> list[dict[str, float]]:
    """bPQ per set for each setting of ``grid``, in its order."""
    return [{name: binary_pq(outputs, settings) for name, outputs in outputs_per_set.items()} for settings in grid]


def weakest_set_best(grid: list[InstanceSettings], scores: list[dict[str, float]]) -> tuple[InstanceSettings, dict]:
    """The setting whose weakest set scores highest (the mean over sets breaks ties), with its scores."""
    best = max(range(len(grid)), key=lambda i: (min(scores[i].values()), float(np.mean(list(scores[i].values())))))
    return grid[best], scores[best]
