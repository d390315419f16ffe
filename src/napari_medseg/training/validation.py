"""Validation after each epoch: loss, pooled pixel metrics and the binary PQ of the nuclei found,
for the run's validation images, or for each dataset of a mixed run (``validate_sets``)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..evaluation.instance import match_instances
from ..evaluation.semantic import semantic_metrics
from ..nuclei.watershed import InstanceSettings, semantic_to_instances
from .distributed import DistContext
from .losses import IGNORE_INDEX
from .mixed import BINARY_NUCLEUS

CLASS_METRICS = ("miou", "mean_dice", "per_class_iou")  # about the class split: not for binary sets


class ValidationStopped(Exception):
    """The user stopped the run while its validation images were being scored (a pass over a
    folder of large images takes a while on a CPU): the scores were not finished and mean nothing."""


@dataclass
class ValidationSet:
    name: str  # the dataset folder's name; "" for a run's only validation data
    binary: bool  # nucleus / background codes (training.mixed): scored as nucleus vs background
    loader: object | None  # this rank's share of its images; None without any
    instances: list[np.ndarray]  # their ground-truth nuclei, for the bPQ


@torch.inference_mode()
def validate(model, loader, loss_fn, num_classes: int, device, ctx: DistContext | None = None,
             autocast=nullcontext, channels_last: bool = False,
             gt_instances: list[np.ndarray] | None = None, binary: bool = False,
             instance_settings: InstanceSettings | None = None,
             foreground_threshold: float | None = None,
             class_weights: list[float] | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[float, dict]:
    """Mean loss per image and metrics from one pooled confusion matrix (summed over ranks).

    With ``gt_instances`` (one map per validation image, in the loader's order) also ``bpq``:
    binary PQ per image of the nuclei the model's output gives (``semantic_to_instances``,
    seeded by its distance head if it has one; ``instance_settings``, default ``InstanceSettings()``),
    averaged over images with nuclei.
    ``binary``: the labels are a binary set's codes; the matrix is nucleus vs background.
    ``foreground_threshold``: the checkpoint's, so that the run is scored as the product will
    segment with it (``inference.class_decision.classify``); None: the argmax. ``class_weights``:
    its class-choice weights (``medseg tune-classes``), for the same reason. ``should_stop``: asked
    before each batch; True raises ``ValidationStopped``.
    """
    model.eval()
    scored = 2 if binary else num_classes
    cm = torch.zeros(scored * scored, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    pq_sum = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    for image, labels, *extra in loader or ():
        if should_stop is not None and should_stop():
            raise ValidationStopped
        image, labels = image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        extra = [t.to(device, non_blocking=True) for t in extra]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(image)
        logits = logits.float()
        loss_sum[0] += float(loss_fn(logits, labels, *extra)) * len(image)
        loss_sum[1] += len(image)
        pred = _decide(logits[:, :num_classes], foreground_threshold, class_weights)  # a distance head's channel comes after
        keep = labels != IGNORE_INDEX
        truth, found = ((labels == BINARY_NUCLEUS).long(), (pred > 0).long()) if binary else (labels, pred)
        cm += torch.bincount(truth[keep] * scored + found[keep], minlength=scored**2)
        if gt_instances is not None:
            _add_binary_pq(pq_sum, logits, pred, num_classes, gt_instances[seen:seen + len(image)],
                           instance_settings)
        seen += len(image)
    if ctx is not None:
        ctx.all_sum(cm)
        ctx.all_sum(loss_sum)
        ctx.all_sum(pq_sum)
    metrics = semantic_metrics(cm.view(scored, scored).cpu().numpy())
    summary = {k: metrics[k] for k in ("miou", "mean_dice", "nucleus_dice", "pixel_accuracy")}
    if gt_instances is not None:
        summary["bpq"] = float(pq_sum[0] / pq_sum[1]) if pq_sum[1] > 0 else float("nan")
    summary["per_class_iou"] = [metrics["per_class"][str(c)]["iou"] for c in range(scored)]
    if binary and num_classes > 2:
        summary = {k: v for k, v in summary.items() if k not in CLASS_METRICS}
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return loss, summary


def _decide(class_logits: torch.Tensor, foreground_threshold: float | None,
            class_weights: list[float] | None = None) -> torch.Tensor:
    """Class ids of ``(B, C, H, W)`` logits by ``classify``'s rule, in torch: the argmax, or with a
    threshold the likeliest nucleus class where ``1 - p(background)`` exceeds it; ``class_weights``
    (one per nucleus class) scale the nucleus classes' probabilities before they are compared."""
    weighted = bool(class_weights)
    if class_logits.shape[1] < 2 or (foreground_threshold is None and not weighted):
        return _likeliest(class_logits)
    probs = torch.softmax(class_logits, 1)
    foreground = _likeliest(probs) > 0 if foreground_threshold is None else 1.0 - probs[:, 0] > foreground_threshold
    nucleus = probs[:, 1:]
    if weighted:
        nucleus = nucleus * torch.tensor(class_weights, dtype=nucleus.dtype, device=nucleus.device).view(1, -1, 1, 1)
    return torch.where(foreground, _likeliest(nucleus) + 1, 0)


def _likeliest(scores: torch.Tensor) -> torch.Tensor:
    """The channel index of the largest score per pixel (the first of equals): ``max``'s indices,
    as ``argmax`` gives them; on a CPU ``argmax`` over this short channel axis took 25x as long
    (0.19 s against 0.008 s for 16 x 4 x 256² on 2 cores, torch 2.14): the default's validation
    went from 8.3 s to 5.6 s (``benchmarks/bench_validation.py``)."""
    return scores.max(1).indices


def validate_sets(model, sets: list[ValidationSet], loss_fn, num_classes: int, device, ctx: DistContext | None = None,
                  autocast=nullcontext, channels_last: bool = False,
                  instance_settings: InstanceSettings | None = None,
                  foreground_threshold: float | None = None,
                  class_weights: list[float] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[float, dict]:
    """``validate`` for each set; a run's only unnamed set as it is, several sets as the mean of
    their figures (class metrics over the class sets) with each set's own under ``sets``."""
    scores = {s.name: validate(model, s.loader, loss_fn, num_classes, device, ctx, autocast, channels_last,
                               s.instances, s.binary, instance_settings, foreground_threshold, class_weights,
                               should_stop)
              for s in sets}
    if len(sets) == 1 and not sets[0].name:
        return scores[""]
    per_set = {name: {"loss": loss, **metrics} for name, (loss, metrics) in scores.items()}
    summary = _mean_over_sets(list(per_set.values()))
    summary["sets"] = per_set
    return summary.pop("loss"), summary


def _mean_over_sets(records: list[dict]) -> dict:
    """Each figure averaged over the sets that have it (a set's undefined bPQ left out)."""
    keys = dict.fromkeys(k for r in records for k in r)
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        if key == "per_class_iou":
            out[key] = [float(v) for v in np.nanmean(np.array(values, float), axis=0)]
            continue
        defined = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(defined)) if defined else float("nan")
    return out


def _add_binary_pq(pq_sum: torch.Tensor, logits: torch.Tensor, pred: torch.Tensor, num_classes: int,
                   gt_instances: list[np.ndarray], settings: InstanceSettings | None = None) -> None:
    """Add (sum of PQ, images counted) of one batch to ``pq_sum``; images without nuclei don't count."""
    pred_np = pred.cpu().numpy()
    dist = torch.sigmoid(logits[:, num_classes]).cpu().numpy() if logits.shape[1] > num_classes else None
    for b, gt in enumerate(gt_instances):
        if gt.max() == 0:
            continue
        h, w = gt.shape  # validation images are padded to the network's stride
        found = semantic_to_instances(pred_np[b, :h, :w], settings, None if dist is None else dist[b, :h, :w])
        pq_sum[0] += match_instances(gt, found).pq
        pq_sum[1] += 1
