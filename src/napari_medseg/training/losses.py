"""Loss functions by name; smp.losses where it has them.

Every model has one output channel per class and inference takes a softmax over them,
so a *binary* model is a 2-class model {background, nucleus}. Its foreground logit
``z = l1 - l0`` is exactly the logit of a single-sigmoid-output network
(``softmax(l)[1] = sigmoid(l1 - l0)``), so the binary losses below are computed on ``z``:

* ``bce``: BCE-with-logits on ``z`` (for 2 classes this equals cross-entropy in value and
  gradient; it is the report's loss, not a different one). With more than 2 classes:
  multi-label BCE-with-logits on the one-hot targets of every channel.
* ``dice`` / ``log_cosh_dice`` / ``focal``: smp's binary mode on ``z`` for 2 classes,
  multiclass mode (softmax) otherwise. Log-Cosh Dice = log(cosh(Dice loss)) (Jadon 2020).
* ``ce`` / ``weighted_ce`` / ``ce_dice``: softmax cross-entropy (+ Dice).

Pixels labelled ``IGNORE_INDEX`` (padding, borders filled by augmentation) never count.

Mixed label sets (``training.mixed``): ``MixedLabels`` trains the class-labelled pixels with
the loss above and the pixels of binary sets (nucleus / background codes) with the same loss in
its 2-class form on two logits, ``l0`` and ``logsumexp(l1, ..., lC-1)``: their softmax is
exactly ``(p(background), p(nucleus) = sum of the nucleus class probabilities)``, so the loss of
a binary pixel depends on the class logits only through that sum, and its gradient never moves
the split between the nucleus classes.

A model with a distance head (``ModelConfig.distance_head``) has one more channel after the
classes; ``WithDistanceHead`` adds its loss: BCE-with-logits of that channel against the
nucleus distance map in [0, 1] (soft targets: the gradient on the logit is simply
``sigmoid - target``, where a squared error on the sigmoid would flatten near 0 and 1), and,
with a ``gradient_weight``, the squared error between the Sobel gradients of the predicted and
the target maps over nucleus pixels (HoVer-Net's "MSGE" on its distance maps, Graham et al.
2019): where two nuclei touch the target's slope flips, and this term asks the prediction to
dip there too, which per-pixel BCE weighs like any other pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import LOSSES, TrainConfigError
from .mixed import BINARY_BACKGROUND, BINARY_NUCLEUS

IGNORE_INDEX = -100


def class_weights_from_frequencies(freq: np.ndarray, rule: str = "auto") -> np.ndarray:
    """Class weights from pixel frequencies.

    ``auto``: median-frequency balancing (Eigen & Fergus 2015), ``w_c = median(f) / f_c`` over
    the classes present: the class of median frequency weighs 1, rarer classes more, background
    (most pixels) much less. A class weighs x14 when it is 14 times rarer than the median class,
    the kind of weight the PanNuke report gives dead cells (not checked here: ../shared/data
    holds no PanNuke; give the report's list explicitly to reproduce it exactly). On all of
    CoNSeP: background 0.06, other 27.6, inflammatory 1.84, epithelial 0.57, spindle 1.
    ``inverse``: ``f_0 / f_c`` (background = 1), extreme: 469 for CoNSeP's 'other'.
    Classes absent from the training data weigh 0.
    """
    freq = np.asarray(freq, float)
    weights = np.zeros_like(freq)
    present = freq > 0
    if not present.any():
        return weights
    if rule == "inverse":
        weights[present] = 1.0 / freq[present]
        return weights / weights[0] if weights[0] > 0 else weights / weights[present].min()
    if rule != "auto":
        raise TrainConfigError(f"Unknown class-weight rule '{rule}' (auto, inverse).")
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def _valid(target: torch.Tensor) -> torch.Tensor:
    return target != IGNORE_INDEX


class BinaryBCE(nn.Module):
    """BCE-with-logits on the foreground logit ``l1 - l0`` of a 2-class model."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits, target):
        z = logits[:, 1] - logits[:, 0]
        keep = _valid(target)
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=z.device, dtype=z.dtype)
        return F.binary_cross_entropy_with_logits(z[keep], (target[keep] > 0).to(z.dtype), pos_weight=pw)


class MultiLabelBCE(nn.Module):
    """BCE-with-logits of every channel against its one-hot target (C > 2)."""

    def __init__(self, weights: torch.Tensor | None = None):
        super().__init__()
        self.weights = weights

    def forward(self, logits, target):
        keep = _valid(target)
        onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        if self.weights is not None:
            loss = loss * self.weights.view(1, -1, 1, 1).to(loss.dtype)
        return loss.mean(1)[keep].mean()


class ForegroundLogit(nn.Module):
    """Feed ``z = l1 - l0`` and the binary target to an smp binary-mode loss."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, logits, target):
        z = (logits[:, 1] - logits[:, 0]).unsqueeze(1)
        t = torch.where(_valid(target), (target > 0).long(), torch.full_like(target, IGNORE_INDEX))
        return self.inner(z, t.unsqueeze(1))


class LogCosh(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, logits, target):
        return torch.log(torch.cosh(self.inner(logits, target)))


class _Sum(nn.Module):
    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits, target):
        return sum(p(logits, target) for p in self.parts)


def build_loss(name: str, weights: torch.Tensor | None = None, num_classes: int = 0) -> nn.Module:
    """``weights`` (per class) apply to weighted_ce, ce_dice and bce; ``num_classes == 2`` selects
    the binary forms (see the module docstring)."""
    from segmentation_models_pytorch import losses as smp_losses

    name = name.lower()
    if name not in LOSSES:
        raise TrainConfigError(f"Unknown loss '{name}'. Choose one of: {', '.join(LOSSES)}.")
    binary = num_classes == 2
    if name in ("ce", "weighted_ce", "ce_dice"):
        ce = nn.CrossEntropyLoss(weight=weights if name != "ce" else None, ignore_index=IGNORE_INDEX)
        if name != "ce_dice":
            return ce
    if name == "bce":
        if binary:
            pos = None if weights is None or float(weights[0]) <= 0 else float(weights[1] / weights[0])
            return BinaryBCE(pos)
        return MultiLabelBCE(weights)
    if binary:
        dice = ForegroundLogit(smp_losses.DiceLoss("binary", from_logits=True, ignore_index=IGNORE_INDEX))
    else:
        dice = smp_losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)
    if name == "dice":
        return dice
    if name == "log_cosh_dice":
        return LogCosh(dice)
    if name == "ce_dice":
        return _Sum(ce, dice)
    if binary:
        return ForegroundLogit(smp_losses.FocalLoss("binary", ignore_index=IGNORE_INDEX))
    return smp_losses.FocalLoss("multiclass", ignore_index=IGNORE_INDEX)


def nucleus_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)``: the background logit and the log-sum-exp of the nucleus class logits."""
    return torch.stack([logits[:, 0], torch.logsumexp(logits[:, 1:], dim=1)], dim=1)


class MixedLabels(nn.Module):
    """``class_loss`` on class-labelled pixels, ``nucleus_loss`` (a 2-class loss) on ``nucleus_logits``
    for binary sets' pixels; each part weighs its share of the batch's labelled pixels."""

    def __init__(self, class_loss: nn.Module, nucleus_loss: nn.Module):
        super().__init__()
        self.class_loss, self.nucleus_loss = class_loss, nucleus_loss

    def forward(self, logits, target):
        coded = target >= BINARY_BACKGROUND
        n_binary = int(coded.sum())
        n_class = int((_valid(target) & ~coded).sum())
        loss = logits.sum() * 0.0  # a graph even for a batch without labelled pixels
        ignored = torch.full_like(target, IGNORE_INDEX)
        if n_class:
            class_target = torch.where(coded, ignored, target)
            loss = loss + self.class_loss(logits, class_target) * (n_class / (n_class + n_binary))
        if n_binary:
            nucleus_target = torch.where(coded, (target == BINARY_NUCLEUS).long(), ignored)
            loss = loss + self.nucleus_loss(nucleus_logits(logits), nucleus_target) * (n_binary / (n_class + n_binary))
        return loss


class WithDistanceHead(nn.Module):
    """``class_loss`` on the first ``num_classes`` channels plus ``weight`` x BCE of the last
    channel against the distance target, over the pixels whose label is not ignored and whose
    target is trusted (``data.DISTANCE_IGNORE``, below 0, is not), each pixel weighing its
    ``distance_weight`` where one is given (``data.touch_weights``: more where nuclei touch),
    plus ``gradient_weight`` x ``distance_gradient_error`` of its sigmoid."""

    def __init__(self, class_loss: nn.Module, num_classes: int, weight: float = 1.0, gradient_weight: float = 0.0):
        super().__init__()
        self.class_loss, self.num_classes, self.weight = class_loss, num_classes, float(weight)
        self.gradient_weight = float(gradient_weight)

    def forward(self, logits, target, distance=None, distance_weight=None):
        if distance is None:
            raise ValueError("A model with a distance head needs distance targets (instance maps) to train.")
        loss = self.class_loss(logits[:, :self.num_classes], target)
        keep = _valid(target) & (distance >= 0)
        if self.weight and keep.any():
            z = logits[:, self.num_classes]
            pixel_weight = None if distance_weight is None else distance_weight[keep].to(z.dtype)
            loss = loss + self.weight * F.binary_cross_entropy_with_logits(z[keep], distance[keep].to(z.dtype),
                                                                           weight=pixel_weight)
        if self.gradient_weight and keep.any():
            error = distance_gradient_error(torch.sigmoid(logits[:, self.num_classes].float()), distance.float(), keep)
            loss = loss + self.gradient_weight * error
        return loss


# 3x3 Sobel, divided by 8: a map rising by s per pixel has a gradient of s
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def _sobel(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 2, H, W): the x and y gradients."""
    kernel = torch.stack([SOBEL_X, SOBEL_X.T]).unsqueeze(1).to(image)
    return F.conv2d(F.pad(image.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), kernel)


def distance_gradient_error(predicted: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the Sobel gradients of ``predicted`` and ``target`` distance
    maps (B, H, W), over nucleus pixels (target > 0) whose whole 3x3 neighbourhood is ``keep``
    (valid and trusted: an ignored neighbour would make the target's gradient meaningless).
    0 where no pixel qualifies."""
    inner = -F.max_pool2d(-keep.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0.5
    mask = inner & (target > 0)
    if not mask.any():
        return predicted.sum() * 0.0  # keeps the graph (and DDP's gradient sync) whole
    difference = (_sobel(predicted) - _sobel(target)).pow(2).sum(1)
    return difference[mask].mean()
