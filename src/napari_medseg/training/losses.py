"""Loss functions by name; smp.losses where it has them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100
LOSSES = ("ce", "weighted_ce", "dice", "ce_dice", "focal")


def class_weights_from_frequencies(freq: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights normalised so that background (class 0) weighs 1.

    On PanNuke this rule gives dead cells a weight of about 14, as in the report.
    Classes absent from the training data get weight 0 (they cannot be learned).
    """
    freq = np.asarray(freq, float)
    weights = np.zeros_like(freq)
    present = freq > 0
    weights[present] = 1.0 / freq[present]
    return weights / weights[0] if weights[0] > 0 else weights / weights[present].min()


class _Sum(nn.Module):
    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits, target):
        return sum(p(logits, target) for p in self.parts)


def build_loss(name: str, weights: torch.Tensor | None = None) -> nn.Module:
    from segmentation_models_pytorch import losses as smp_losses

    name = name.lower()
    if name not in LOSSES:
        raise ValueError(f"Unknown loss '{name}'. Choose one of: {', '.join(LOSSES)}.")
    ce = nn.CrossEntropyLoss(weight=weights if name in ("weighted_ce", "ce_dice") else None, ignore_index=IGNORE_INDEX)
    dice = smp_losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)
    if name in ("ce", "weighted_ce"):
        return ce
    if name == "dice":
        return dice
    if name == "ce_dice":
        return _Sum(ce, dice)
    return smp_losses.FocalLoss("multiclass", ignore_index=IGNORE_INDEX)
