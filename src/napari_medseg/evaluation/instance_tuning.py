"""Nucleus post-processing (``nuclei.watershed.InstanceSettings``) chosen by measurement
(``benchmarks/tune_instances.py`` for the shipped defaults; ``medseg tune-nuclei``, i.e.
``tune_nuclei_checkpoint``, records a model's own in a copy of its checkpoint).

A model runs once per image; its class map and distance map are kept, and every candidate
setting re-runs only the watershed on them, as ``Segmenter.segment_nuclei`` would, and is scored
by binary PQ against the images' instance maps. Of several sets the setting that serves the
weakest best wins (the trainer's ``val_worst_set_bpq`` rule). Tune on training images: the
held-out ones then stay a fair check of the choice.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..inference.segmenter import Segmenter
from ..inference.settings import TileSettings
from ..io.dataset import GROUP_PATTERN, DatasetError, open_dataset
from ..models import load_checkpoint, resolve_model_path, save_checkpoint
from ..models.weights import read_state_dict
from ..nuclei.watershed import TUNED_FIELDS, InstanceSettings, semantic_to_instances
from ..steps import ProgressCallback
from .instance import aggregate_instance_stats, image_instance_stats
from .threshold import (ThresholdTuningError, check_checkpoint_target, model_group_pattern, model_val_groups,
                        samples_of_groups)

# the candidates medseg tune-nuclei tries (benchmarks/tune_instances.py's sweep)
MARKER_THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5)
MIN_SIZES = (10, 30, 45, 60, 80, 100)  # smallest nucleus, model px
MIN_MARKER_SIZES = (4, 10)  # smallest seed, model px


@dataclass
class ModelOutput:
    """One labelled image with what the model made of it."""

    labels: np.ndarray  # ground-truth class map
    instances: np.ndarray  # ground-truth instance map
    class_map: np.ndarray  # predicted, uint8
    # the distance head's map, None without one; float32 as the product cuts with it (a float16 copy
    # moves seeds that sit on the marker threshold)
    distance: np.ndarray | None


def model_outputs(segmenter, samples, tiles=None, on_image: Callable[[], None] | None = None) -> list[ModelOutput]:
    """The model's class and distance maps of every sample (``.image``, ``.labels``, ``.instances``),
    run with ``tiles`` (``TileSettings``; e.g. test-time flips); ``on_image()`` after each."""
    outputs = []
    for s in samples:
        distance = np.zeros(s.image.shape[:2], np.float32) if segmenter.has_distance_head else None
        class_map = segmenter.segment(s.image, tiles, distance_out=distance)
        outputs.append(ModelOutput(s.labels, s.instances, np.asarray(class_map, np.uint8),
                                   distance))
        if on_image is not None:
            on_image()
    return outputs


def binary_pq(outputs: list[ModelOutput], settings: InstanceSettings) -> float:
    """bPQ (PanNuke: per image, averaged) of the nuclei ``settings`` cut from the model's outputs."""
    stats = []
    for o in outputs:
        found = semantic_to_instances(o.class_map, settings, o.distance)
        stats.append(image_instance_stats(o.instances, (o.labels > 0).astype(np.uint8), found,
                                          (o.class_map > 0).astype(np.uint8), 2))
    return aggregate_instance_stats(stats, ["background", "nucleus"])["bpq"]


def settings_grid(base: InstanceSettings | None = None, **values) -> list[InstanceSettings]:
    """Every combination of ``values`` (field name -> candidates) over ``base``."""
    base = base or InstanceSettings()
    names = list(values)
    return [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*(values[n] for n in names))]


def score_grid(outputs_per_set: dict[str, list[ModelOutput]], grid: list[InstanceSettings],
               on_setting: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """bPQ per set for each setting of ``grid``, in its order; ``on_setting()`` after each."""
    scores = []
    for settings in grid:
        scores.append({name: binary_pq(outputs, settings) for name, outputs in outputs_per_set.items()})
        if on_setting is not None:
            on_setting()
    return scores


def weakest_set_best(grid: list[InstanceSettings], scores: list[dict[str, float]]) -> tuple[InstanceSettings, dict]:
    """The setting whose weakest set scores highest (the mean over sets breaks ties), with its scores."""
    best = max(range(len(grid)), key=lambda i: _rank(scores[i]))
    return grid[best], scores[best]


def chosen_over(before: InstanceSettings, before_scores: dict, grid: list[InstanceSettings],
                scores: list[dict[str, float]]) -> tuple[InstanceSettings, dict]:
    """``weakest_set_best``, where it does better than the model's own settings; else those (a tie
    changes nothing: when no setting finds a nucleus, all score 0 and the first had won)."""
    chosen, chosen_scores = weakest_set_best(grid, scores)
    return (chosen, chosen_scores) if _rank(chosen_scores) > _rank(before_scores) else (before, before_scores)


def _rank(scores: dict[str, float]) -> tuple[float, float]:
    """What a setting is chosen by: its weakest set's bPQ, then the mean over sets."""
    return min(scores.values()), float(np.mean(list(scores.values())))


def tune_nuclei_checkpoint(model: str | os.PathLike, data: list[str | Path], out: str | os.PathLike,
                           groups: list[str] | None = None, all_images: bool = False, tta: bool = False,
                           device: str = "auto", marker_thresholds=MARKER_THRESHOLDS, min_sizes=MIN_SIZES,
                           min_marker_sizes=MIN_MARKER_SIZES,
                           progress_for: Callable[[int], ProgressCallback | None] | None = None,
                           overwrite: bool = False) -> dict:
    """Choose ``model``'s nucleus post-processing on the labelled images of the dataset folders
    ``data`` (each one set; the setting whose weakest set's bPQ is highest wins) and write the
    checkpoint with it (``CheckpointMeta.instance_settings``) and a record of the tuning
    (``metrics.instance_tuning``) to ``out``, atomically; the input is never touched.

    The images: those of the source images ``groups``, the model's validation images
    (``data.val_groups``) without them, every image with ``all_images``; a folder none of whose
    images is among them is left out (said in the result). A model without a distance head has
    no seeds to tune: only the smallest nucleus is. ``progress_for(steps)`` gives the progress
    callback once the work is known (one step per image, then one per setting).
    """
    source = resolve_model_path(model)
    check_checkpoint_target(source, Path(out), overwrite, data)
    segmenter = Segmenter.load(source, device=device)  # PyTorch: the reference the settings are measured on
    if not all_images:
        groups = groups or model_val_groups(segmenter.meta)
    pattern = GROUP_PATTERN if all_images else model_group_pattern(segmenter.meta)
    samples_per_set, left_out, why = {}, [], []
    for folder in [Path(d) for d in data]:
        open_dataset(folder, require_labels=True)  # a missing or malformed folder says so itself
        try:
            classes, samples = samples_of_groups(folder, None if all_images else groups, pattern)
        except DatasetError as exc:
            left_out.append(folder.name)  # none of its images is among the groups
            why.append(str(exc))
            continue
        if len(classes) != 2 and classes != segmenter.classes:
            raise ThresholdTuningError(f"{folder}: the data's classes {classes} differ from the model's {segmenter.classes}")
        if not any(s.instances is not None for s in samples):
            raise ThresholdTuningError(f"{folder}: no instance maps (instances/); nuclei are tuned against annotated "
                                       "nuclei")
        name = folder.name if folder.name not in samples_per_set else str(folder)
        samples_per_set[name] = [s for s in samples if s.instances is not None]
    if not samples_per_set:
        raise ThresholdTuningError(" ".join(why) if why else
                                   f"none of {', '.join(map(str, data))} holds an image of the groups {groups}")

    before = segmenter.instance_settings
    values = {"min_size": list(min_sizes)}
    if segmenter.has_distance_head:
        values.update(marker_threshold=list(marker_thresholds), min_marker_size=list(min_marker_sizes))
    grid = settings_grid(before, **values)
    images = sum(len(v) for v in samples_per_set.values())
    progress = progress_for(images + len(grid) + 1) if progress_for is not None else None
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], images + len(grid) + 1)

    outputs = {name: model_outputs(segmenter, samples, TileSettings(tta=tta), step)
               for name, samples in samples_per_set.items()}
    before_scores = score_grid(outputs, [before], step)[0]
    chosen, chosen_scores = chosen_over(before, before_scores, grid, score_grid(outputs, grid, step))
    tuned = {k: getattr(chosen, k) for k in TUNED_FIELDS if k in values}
    result = {"settings": tuned, "bpq": chosen_scores,
              "before": {"settings": {k: getattr(before, k) for k in TUNED_FIELDS}, "bpq": before_scores},
              "images": {name: len(v) for name, v in outputs.items()}, "left_out": left_out,
              "candidates": len(grid)}
    record = {**result, "data": [str(d) for d in data], "groups": None if all_images else list(groups),
              "tta": bool(tta), "rule": "the weakest set's bPQ, then the mean over sets"}
    _write_instance_settings(source, out, tuned, record)
    return result


def _write_instance_settings(source: Path, out: str | os.PathLike, tuned: dict, record: dict) -> Path:
    """A copy of ``source`` at ``out`` with ``tuned`` as its nucleus settings (the fields left out
    keep the model's own) and ``record`` as ``metrics.instance_tuning``."""
    model, meta = load_checkpoint(source)
    meta.instance_settings = {**meta.instance_settings, **tuned}
    meta.metrics["instance_tuning"] = record
    half = any(t.dtype == torch.float16 for t in read_state_dict(source).values())  # keep the stored precision
    return save_checkpoint(out, model, meta, half=half)  # atomic: the input is never half-overwritten
