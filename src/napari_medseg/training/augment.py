"""Augmentation with torchvision transforms v2: geometry on image and mask, colour on the image only.

Order: a random crop (with room for scaling), random scaling about its centre, the centre
crop of the requested size, flips, exact 90-degree rotations (``torch.rot90``, no
interpolation), then stain jitter in haematoxylin-eosin-DAB space (RGB images), then colour
jitter of brightness, contrast, saturation, hue and sharpness.
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


class RandomStainJitter(v2.Transform):
    """H&E stain augmentation (Tellez et al., IEEE TMI 2018): RGB -> optical density -> stain
    concentrations by colour deconvolution (Ruifrok & Johnston; scikit-image's H-E-DAB
    matrices), each stain scaled by ``U[1 - sigma, 1 + sigma]`` and shifted by
    ``U[-sigma, sigma]`` optical-density units, then recombined. Mimics differences in staining
    between labs and batches; labels are untouched, and ``sigma = 0`` gives the image back.

    ``scale_range = (low, high)`` draws each stain's factor log-uniformly from that range
    instead: wide enough to cover lab-to-lab differences (MoNuSeg's slides carry about 1.7x
    CoNSeP's haematoxylin and eosin), which ``1 +- sigma`` with a small sigma does not.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, sigma: float, scale_range: tuple[float, float] | None = None):
        super().__init__()
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.sigma = float(sigma)
        self.log_range = None if scale_range is None else (math.log(scale_range[0]), math.log(scale_range[1]))
        # float64: a crop's few hundred thousand values cost nothing more, and the result is the
        # same whatever path float32 matrix products take on the machine (the check against the
        # float64 reference failed once in seven runs of the suite, 5 % of values off by 3e-5)
        self.to_stains = torch.as_tensor(hed_from_rgb, dtype=torch.float64)
        self.to_density = torch.as_tensor(rgb_from_hed, dtype=torch.float64)

    def make_params(self, flat_inputs):
        s = self.sigma
        if self.log_range is None:
            scale = 1.0 + (2 * torch.rand(3) - 1) * s
        else:
            low, high = self.log_range
            scale = torch.exp(low + (high - low) * torch.rand(3))
        return {"scale": scale, "shift": (2 * torch.rand(3) - 1) * s}

    def transform(self, inpt, params):
        if inpt.ndim < 3 or inpt.shape[-3] != 3:  # stains are defined for RGB only
            return inpt
        density = -torch.log(inpt.as_subclass(torch.Tensor).double().clamp(min=1e-6)).movedim(-3, -1)
        stains = density @ self.to_stains * params["scale"].double() + params["shift"].double()
        rgb = torch.exp(-(stains @ self.to_density)).movedim(-1, -3).clamp_(0, 1)
        return tv_tensors.wrap(rgb.to(inpt.dtype), like=inpt)


def build_augmentation(cfg, crop_size: int):
    """A callable ``(image float CxHxW, labels int64 HxW, *maps float HxW) -> same``; ``cfg=None`` crops only."""
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
        if cfg.stain or cfg.stain_scale:
            steps.append(RandomStainJitter(cfg.stain, cfg.stain_scale))
        if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
        if cfg.sharpness:
            steps.append(v2.RandomAdjustSharpness(sharpness_factor=2.0, p=cfg.sharpness))
    pipeline = v2.Compose(steps)

    def apply(image: torch.Tensor, labels: torch.Tensor, *maps: torch.Tensor):
        """``maps`` (float ``HxW`` each, optional: the distance target, its loss weights) move with
        the labels (nearest-neighbour where scaled); they are returned after the labels, their
        pixels from outside the image set to -100 like the labels'."""
        image, mask, *moved = pipeline(tv_tensors.Image(image), tv_tensors.Mask(labels),
                                       *(tv_tensors.Mask(m) for m in maps))
        return (image.as_subclass(torch.Tensor).clamp_(0, 1), mask.as_subclass(torch.Tensor).long(),
                *(m.as_subclass(torch.Tensor).float() for m in moved))

    return apply
