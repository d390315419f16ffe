"""Validation after each epoch: loss, pooled pixel metrics and the binary PQ of the nuclei found."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from ..evaluation.instance import match_instances
from ..evaluation.semantic import semantic_metrics
from ..nuclei.watershed import semantic_to_instances
from .distributed import DistContext
from .losses import IGNORE_INDEX


@torch.inference_mode()
def validate(model, loader, loss_fn, num_classes: int, device, ctx: DistContext | None = None,
             autocast=nullcontext, channels_last: bool = False,
             gt_instances: list[np.ndarray] | None = None) -> tuple[float, dict]:
    """Mean loss per image and metrics from one pooled confusion matrix (summed over ranks).

    With ``gt_instances`` (one map per validation image, in the loader's order) also ``bpq``:
    binary PQ per image of the nuclei the model's output gives (``semantic_to_instances``,
    seeded by its distance head if it has one), averaged over images with nuclei.
    """
    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    pq_sum = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    for image, labels, *extra in loader or ():
        image, labels = image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        extra = [t.to(device, non_blocking=True) for t in extra]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(image)
        logits = logits.float()
        loss_sum[0] += float(loss_fn(logits, labels, *extra)) * len(image)
        loss_sum[1] += len(image)
        pred = logits[:, :num_classes].argmax(1)  # a distance head's channel comes after the classes
        keep = labels != IGNORE_INDEX
        cm += torch.bincount(labels[keep] * num_classes + pred[keep], minlength=num_classes**2)
        if gt_instances is not None:
            _add_binary_pq(pq_sum, logits, pred, num_classes, gt_instances[seen:seen + len(image)])
        seen += len(image)
    if ctx is not None:
        ctx.all_sum(cm)
        ctx.all_sum(loss_sum)
        ctx.all_sum(pq_sum)
    metrics = semantic_metrics(cm.view(num_classes, num_classes).cpu().numpy())
    summary = {k: metrics[k] for k in ("miou", "mean_dice", "nucleus_dice", "pixel_accuracy")}
    if gt_instances is not None:
        summary["bpq"] = float(pq_sum[0] / pq_sum[1]) if pq_sum[1] > 0 else float("nan")
    summary["per_class_iou"] = [metrics["per_class"][str(c)]["iou"] for c in range(num_classes)]
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return loss, summary


def _add_binary_pq(pq_sum: torch.Tensor, logits: torch.Tensor, pred: torch.Tensor, num_classes: int,
                   gt_instances: list[np.ndarray]) -> None:
    """Add (sum of PQ, images counted) of one batch to ``pq_sum``; images without nuclei don't count."""
    pred_np = pred.cpu().numpy()
    dist = torch.sigmoid(logits[:, num_classes]).cpu().numpy() if logits.shape[1] > num_classes else None
    for b, gt in enumerate(gt_instances):
        if gt.max() == 0:
            continue
        h, w = gt.shape  # validation images are padded to the network's stride
        found = semantic_to_instances(pred_np[b, :h, :w], None, None if dist is None else dist[b, :h, :w])
        pq_sum[0] += match_instances(gt, found).pq
        pq_sum[1] += 1
