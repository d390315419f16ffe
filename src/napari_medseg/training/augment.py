"""Augmentation with torchvision transforms v2: geometry on image and mask, colour on the image only.

Order: a random crop (with room for scaling), random scaling about its centre, the centre
crop of the requested size, flips, exact 90-degree rotations (``torch.rot90``, no
interpolation), then colour jitter of brightness, contrast, saturation, hue and sharpness.
Cropping before scaling gives the same distribution as scaling the whole image first, at a
fraction of the cost. Pixels brought in from outside the image get the ignore index
(-100) in the mask, so they never count in the loss.
"""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

FILL = {tv_tensors.Mask: -100, "others": 0}


class RandomRot90(v2.Transform):
    """Rotate image and mask together by k * 90 degrees, k uniform in {0, 1, 2, 3}."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt, params):
        if params["k"] == 0:
            return inpt
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


def build_augmentation(cfg, crop_size: int):
    """A callable ``(image float CxHxW, labels int64 HxW) -> same``; ``cfg=None`` crops only."""
    steps = []
    if cfg is not None and cfg.scale is not None:
        smin = min(cfg.scale)
        region = int(math.ceil(crop_size / min(smin, 1.0))) + 2
        steps += [v2.RandomCrop(region, pad_if_needed=True, fill=FILL),
                  v2.RandomAffine(degrees=0, scale=tuple(cfg.scale), fill=FILL),
                  v2.CenterCrop(crop_size)]
    else:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=FILL))
    if cfg is not None:
        if cfg.flip:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if cfg.rotate90:
            steps.append(RandomRot90())
        if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        if cfg.sharpness:
            steps.append(v2.RandomAdjustSharpness(sharpness_factor=2.0, p=cfg.sharpness))
    pipeline = v2.Compose(steps)

    def apply(image: torch.Tensor, labels: torch.Tensor):
        image, mask = pipeline(tv_tensors.Image(image), tv_tensors.Mask(labels))
        return image.as_subclass(torch.Tensor).clamp_(0, 1), mask.as_subclass(torch.Tensor).long()

    return apply
