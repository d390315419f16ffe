"""Augmentation with torchvision transforms v2: geometry on image and mask, colour on the image only."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def build_augmentation(cfg, crop_size: int):
    """A callable ``(image float CxHxW, labels int64 HxW) -> same``; ``cfg=None`` crops only."""
    steps = []
    if cfg is not None and cfg.scale is not None:
        # Scale about the crop, filling borders with the ignore index for the mask.
        steps.append(v2.RandomAffine(degrees=0, scale=tuple(cfg.scale), fill={tv_tensors.Mask: -100, "others": 0}))
    steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Mask: -100, "others": 0}))
    if cfg is not None:
        if cfg.flip:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if cfg.rotate90:
            steps.append(v2.RandomApply([v2.RandomRotation((90, 90))], p=0.5))
        if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        if cfg.sharpness:
            steps.append(v2.RandomAdjustSharpness(sharpness_factor=2.0, p=cfg.sharpness))
    pipeline = v2.Compose(steps)

    def apply(image: torch.Tensor, labels: torch.Tensor):
        image, mask = pipeline(tv_tensors.Image(image), tv_tensors.Mask(labels))
        return image.as_subclass(torch.Tensor).clamp_(0, 1), mask.as_subclass(torch.Tensor).long()

    return apply
