"""A classical (no learning) nucleus segmentation of H&E images, as the baseline for the models.

Pipeline of ``classical_nuclei``:

1. colour deconvolution (``skimage.color.rgb2hed``, Ruifrok & Johnston's H&E-DAB stain
   vectors) -> the haematoxylin optical density, which is high in nuclei;
2. gaussian smoothing of that channel (``sigma``);
3. Otsu threshold of the smoothed channel (``skimage.filters.threshold_otsu``), computed
   per image: pixels above it are nucleus;
4. clean-up: a binary opening (``opening_radius``), holes filled, objects under
   ``min_size`` px removed;
5. instances by the project's distance-transform watershed
   (``napari_medseg.instances.semantic_to_instances`` with ``instance_settings``).

It is binary: it finds nuclei but cannot tell their type (inflammatory, epithelial, ...).
The class map holds 0 = background, 1 = nucleus. When it is scored against a multi-class
ground truth, give it no nucleus classes (``as_unclassified``): it then counts in the binary
numbers (nucleus Dice, bPQ, detection F1, AJI) and scores nothing in the per-class ones.

The defaults (``ClassicalSettings``) were picked by a small grid (sigma 1/2, threshold scale
0.8/1/1.2, opening 0/2, seed distance 4/6) on 62 CoNSeP patches of *training* source images
(never the validation images train_12/19/22/25): binary Dice 0.71, bPQ 0.25 there. On the
validation split it reaches Dice 0.63, bPQ 0.19 (``benchmarks/accuracy.py``).

This module is core: plain NumPy / SciPy / scikit-image, no napari, Qt or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MedsegError
from .masks import without_small_objects
from .watershed import InstanceSettings, semantic_to_instances


class BaselineInputError(MedsegError, ValueError):
    """The image cannot be colour-deconvolved as given."""


@dataclass
class ClassicalSettings:
    # gaussian sigma (px) applied to the haematoxylin channel before thresholding; 0 = off.
    # Smooths JPEG noise and chromatin texture so nuclei threshold as solid blobs.
    sigma: float = 1.0
    # multiplies the Otsu threshold: < 1 takes more (fainter) pixels as nucleus, > 1 fewer
    threshold_scale: float = 1.0
    # radius (px) of the disk used for a binary opening after thresholding (cuts thin bridges
    # and stroma fibres); 0 = off
    opening_radius: int = 2
    # connected objects smaller than this (px) are dropped; at 40x (~0.25 um/px) the smallest
    # nuclei cover ~50 px
    min_size: int = 30
    # fill background regions enclosed by nucleus (pale nucleus centres)
    fill_holes: bool = True
    # watershed splitting of touching nuclei (see napari_medseg.instances.InstanceSettings)
    instance_settings: InstanceSettings = field(
        default_factory=lambda: InstanceSettings(min_distance=6, sigma=1.0, min_size=30, fill_holes=True)
    )


def _check_rgb(image) -> np.ndarray:
    """``(H, W, 3)`` (or RGBA, alpha dropped) uint8 or float in [0, 1] -> float64 RGB in [0, 1]."""
    try:
        image = np.asarray(image)
    except Exception as exc:  # ragged lists and the like
        raise BaselineInputError(f"The image is not an array: {exc}") from exc
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        raise BaselineInputError(
            f"The classical baseline needs an RGB H&E image for colour deconvolution; got a gray image of shape "
            f"{image.shape}. Gray images carry no stain colour to separate haematoxylin from eosin."
        )
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        hint = " (channels first? use np.moveaxis(image, 0, -1))" if image.ndim == 3 and image.shape[0] in (3, 4) else ""
        raise BaselineInputError(f"Expected an (H, W, 3) RGB image, got shape {image.shape}{hint}.")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise BaselineInputError(f"The image is too small to segment: shape {image.shape}.")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise BaselineInputError("The image contains NaN or infinite pixels.")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise BaselineInputError(
                f"Float images must hold values in [0, 1]; this one spans [{lo:.4g}, {hi:.4g}]. "
                "Pass uint8 RGB, or scale to [0, 1] first."
            )
        return image.astype(np.float64)
    raise BaselineInputError(
        f"Unsupported pixel type {image.dtype}: pass uint8 RGB (0..255) or float RGB in [0, 1]."
    )


def haematoxylin(image_rgb, sigma: float = 1.0) -> np.ndarray:
    """The (optionally smoothed) haematoxylin channel of ``rgb2hed``: float64 ``(H, W)``, high in nuclei."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    rgb = _check_rgb(image_rgb)
    h = rgb2hed(rgb)[..., 0]
    if sigma > 0:
        h = ndi.gaussian_filter(h, sigma)
    return h


def classical_foreground(image_rgb, settings: ClassicalSettings | None = None) -> np.ndarray:
    """Boolean nucleus mask: steps 1-4 of the module pipeline."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    s = settings or ClassicalSettings()
    h = haematoxylin(image_rgb, s.sigma)
    if float(h.max() - h.min()) < 1e-6:  # a flat image: nothing to separate
        return np.zeros(h.shape, bool)
    mask = h > threshold_otsu(h) * s.threshold_scale
    if s.opening_radius > 0:
        mask = ndi.binary_opening(mask, structure=disk(s.opening_radius).astype(bool))
    if s.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    return without_small_objects(mask, s.min_size)[0]


def classical_nuclei(image_rgb, settings: ClassicalSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(class_map, instances)`` of an H&E RGB image by the classical pipeline.

    ``class_map`` is uint8 with 0 = background and 1 = nucleus (no nucleus types: see the
    module docstring); ``instances`` is int32 with ids 1..N, 0 = background. Raises
    ``BaselineInputError`` for gray, channel-first, non-RGB, NaN or out-of-range images.
    """
    s = settings or ClassicalSettings()
    mask = classical_foreground(image_rgb, s)
    class_map = mask.astype(np.uint8)
    instances = semantic_to_instances(class_map, s.instance_settings)
    # the watershed may drop pixels (its own min_size): keep both maps consistent
    class_map = (instances > 0).astype(np.uint8)
    return class_map, instances


def as_unclassified(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """A binary nucleus map prepared for scoring against ``num_classes`` classes that it cannot tell apart.

    With two classes (background, nucleus) the map is returned as is. With more, nucleus
    pixels get the id ``num_classes`` (one past the known classes): they are foreground for
    the binary numbers but match no ground-truth class, so per-class IoU/F1/PQ score 0
    recall and the baseline claims no class it cannot see. Score with
    ``class_names + ["unclassified"]``.
    """
    class_map = np.asarray(class_map)
    if num_classes <= 2:
        return class_map.astype(np.uint8)
    out = np.zeros(class_map.shape, np.uint8)
    out[class_map > 0] = num_classes
    return out


__all__ = ["BaselineInputError", "ClassicalSettings", "as_unclassified", "classical_foreground", "classical_nuclei",
           "haematoxylin"]
