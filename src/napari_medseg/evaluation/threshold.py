"""A model's foreground threshold, tuned on labelled images (the reports tuned their operating
point on validation data rather than taking argmax or 0.5).

The threshold applies to the nucleus (foreground) probability ``1 - p(background)``; pixels
above it get their likeliest foreground class (``inference.classify``). It is chosen to
maximise the pooled binary Dice over the given images (``semantic.threshold_search``: one pass,
histograms, no re-thresholding), on a grid of 0.01 from 0.10 to 0.90. ``tune_checkpoint``
writes it, with a record of the tuning, into a copy of the checkpoint, which applies it from
then on (``Segmenter.foreground_threshold``).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MedsegError
from ..inference.segmenter import Segmenter
from ..inference.settings import TileSettings
from ..io.dataset import GROUP_PATTERN, DatasetError, open_dataset, source_group
from ..io.outputs import check_file_target, remove_stale_temps
from ..models import load_checkpoint, resolve_model_path, save_checkpoint
from ..models.weights import read_state_dict
from ..steps import ProgressCallback
from .semantic import threshold_search

GRID = np.round(np.arange(0.10, 0.9001, 0.01), 2)


class ThresholdTuningError(MedsegError, ValueError):
    """The model and the data cannot be tuned together: no images named, or other classes."""


def samples_of_groups(data: str | Path, groups: list[str] | None = None, group_pattern: str = GROUP_PATTERN):
    """``(classes, samples)``: the labelled images of a dataset folder whose source image is in
    ``groups`` (``<folder name>/<group>`` as a checkpoint's ``data.val_groups`` names them, or
    the bare group), each with its ``group``; every image for ``None``. Groups are made as
    training makes them (``DatasetFolder.group``). Raises ``DatasetError`` if none match."""
    folder = open_dataset(data, require_labels=True)
    chosen, seen = {}, {}
    for stem in folder.stems:
        group = folder.group(stem, group_pattern, prefixed=False)
        seen.setdefault(group, None)
        names = {group, f"{folder.root.name}/{group}"}
        if folder.images_are_own_sources:  # a model trained before its images were their own groups
            old = source_group(stem, pattern=group_pattern)
            names |= {old, f"{folder.root.name}/{old}"}
        if groups is None or names & set(groups):
            chosen[stem] = group
    if not chosen:
        raise DatasetError(f"No image of {folder.root} belongs to the groups {groups}; its source images are "
                           f"{group_list(folder.root.name, list(seen))}. Tune on all of them with --all-images, "
                           "or on some with --groups NAME,NAME.")
    return folder.classes, [replace(folder.load(stem), group=group) for stem, group in chosen.items()]


def group_list(folder_name: str, groups: list[str], shown: int = 6) -> str:
    """A folder's source images as ``--groups`` takes them (``<folder>/<group>``), the first few."""
    names = [f"{folder_name}/{g}" for g in groups[:shown]]
    return ", ".join(names) + (f", ... ({len(groups)} in all)" if len(groups) > shown else "")


def model_val_groups(meta) -> list[str]:
    """The source images a checkpoint's run held out (``data.val_groups``), refusing a record
    that names none or is not a list of names (an edited file)."""
    groups = meta.data.get("val_groups") if isinstance(meta.data, dict) else None
    if groups is None or groups == []:
        raise ThresholdTuningError("the model's metadata names no validation images; pass --groups or --all-images")
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ThresholdTuningError(f"the model's data.val_groups must be a list of source image names, got {groups!r} "
                                   "(the file was edited or written by another program); pass --groups or --all-images")
    return groups


def model_group_pattern(meta) -> str:
    """The ``data.group_pattern`` a checkpoint's run grouped its images by (the default where it
    records none): how its ``data.val_groups`` name source images."""
    training = meta.training if isinstance(meta.training, dict) else {}
    config = training.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    pattern = data.get("group_pattern", GROUP_PATTERN) if isinstance(data, dict) else GROUP_PATTERN
    try:
        groups = re.compile(pattern).groups if isinstance(pattern, str) else 0
    except re.error:
        groups = 0
    if not groups:
        raise ThresholdTuningError(f"the model's training.config.data.group_pattern {pattern!r} is not a regular "
                                   "expression with a group: its validation images cannot be found; pass "
                                   "--all-images, or --groups with a folder whose stems are the groups")
    return pattern


def tune_foreground_threshold(segmenter, samples, settings=None, thresholds=GRID, progress=None) -> dict:
    """The foreground threshold that maximises pooled nucleus Dice of ``segmenter`` on ``samples``
    (objects with ``.image`` and ``.labels``); ``progress(done, total)`` after each image.

    Returns ``threshold``, ``nucleus_dice`` at it, ``argmax_nucleus_dice`` (the model without a
    threshold), ``images`` and the ``curve`` (``thresholds``, ``nucleus_dice``) over the grid.
    """
    samples = list(samples)
    if not samples:
        raise DatasetError("No labelled images to tune the threshold on.")
    counts = {"inter": 0, "total": 0}

    def pairs():
        for done, s in enumerate(samples, 1):
            probs = segmenter.probabilities(s.image, settings)
            gt = np.asarray(s.labels) > 0
            by_argmax = probs.argmax(0) > 0
            counts["inter"] += int((gt & by_argmax).sum())
            counts["total"] += int(gt.sum() + by_argmax.sum())
            yield gt, np.clip(1.0 - probs[0], 0.0, 1.0)
            if progress is not None:
                progress(done, len(samples))

    found = threshold_search(pairs(), thresholds=thresholds, metric="dice")
    return {
        "threshold": found["threshold"],
        "nucleus_dice": found["dice"],
        "argmax_nucleus_dice": 2 * counts["inter"] / counts["total"] if counts["total"] else float("nan"),
        "images": len(samples),
        "curve": {"thresholds": found["curve"]["thresholds"], "nucleus_dice": found["curve"]["dice"]},
    }


def tune_checkpoint(model: str | os.PathLike, data: str | Path, out: str | os.PathLike,
                    groups: list[str] | None = None, all_images: bool = False, tta: bool = False,
                    device: str = "auto", progress_for: Callable[[int], ProgressCallback | None] | None = None,
                    overwrite: bool = False) -> dict:
    """Tune ``model``'s foreground threshold on the labelled images of ``data`` and write the
    checkpoint with it to ``out`` (atomically, in the precision the input was stored in; the
    input is never touched). Returns ``tune_foreground_threshold``'s result.

    The images: those of the source images ``groups``, the model's validation images
    (``data.val_groups``) without them, every image with ``all_images``.
    ``progress_for(images)`` gives the progress callback once the number of images is known.
    An existing ``out`` is replaced only with ``overwrite``, and never when it is the input.
    """
    source = resolve_model_path(model)
    check_checkpoint_target(source, Path(out), overwrite, data)
    segmenter = Segmenter.load(source, device=device)
    segmenter.foreground_threshold = None  # tune from the model's raw probabilities
    if not all_images:
        groups = groups or model_val_groups(segmenter.meta)
    classes, samples = samples_of_groups(data, None if all_images else groups,
                                         GROUP_PATTERN if all_images else model_group_pattern(segmenter.meta))
    if len(classes) != 2 and classes != segmenter.classes:
        raise ThresholdTuningError(f"the data's classes {classes} differ from the model's {segmenter.classes}")
    progress = progress_for(len(samples)) if progress_for is not None else None
    result = tune_foreground_threshold(segmenter, samples, TileSettings(tta=tta), progress=progress)
    record = {"data": str(data), "groups": None if all_images else groups, "images": result["images"], "tta": bool(tta)}
    write_threshold(source, out, result, record)
    return result


def check_checkpoint_target(source: Path, out: Path, overwrite: bool, data=()) -> None:
    """Refuses an ``out`` that is the input checkpoint, a folder, a file of the ``data`` folders
    read (one dataset or several), or (without ``overwrite``) an existing file; removes the temp
    files a killed run left beside it."""
    if out.exists() and os.path.realpath(out) == os.path.realpath(source):
        raise ThresholdTuningError(f"--out {out} is the input checkpoint: write the tuned copy to another file.")
    if out.is_dir():
        raise ThresholdTuningError(f"--out {out} is a folder: give the checkpoint file to write, "
                                   f"e.g. {out / 'tuned.safetensors'}.")
    # a file of the data read is never replaced, --overwrite or not
    check_file_target(out, [data] if isinstance(data, (str, os.PathLike)) else list(data), "--out", overwrite=True)
    if out.exists() and not overwrite:
        raise ThresholdTuningError(f"--out {out} exists: choose another file or pass --overwrite to replace it.")
    remove_stale_temps(out.parent)


def write_threshold(source: Path, out: str | os.PathLike, result: dict, record: dict) -> Path:
    """A copy of the checkpoint ``source`` at ``out`` with the tuned threshold in its metadata
    and ``metrics.threshold_tuning``: the Dice at it and with argmax, plus ``record``."""
    model, meta = load_checkpoint(source)
    meta.foreground_threshold = round(float(result["threshold"]), 2)
    meta.metrics["threshold_tuning"] = {
        "threshold": meta.foreground_threshold, "nucleus_dice": result["nucleus_dice"],
        "argmax_nucleus_dice": result["argmax_nucleus_dice"], **record}
    half = any(t.dtype == torch.float16 for t in read_state_dict(source).values())  # keep the stored precision
    return save_checkpoint(out, model, meta, half=half)  # atomic: the input is never half-overwritten
