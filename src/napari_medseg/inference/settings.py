"""Every setting that decides how an image is run through a model, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MedsegError
from ..models.checkpoint import MAX_NETWORK_ZOOM, MIN_NETWORK_ZOOM, is_network_zoom

BLENDS = ("gaussian", "cosine")
AMP_DTYPES = ("float16", "bfloat16")
BACKENDS = ("auto", "torch", "openvino", "onnxruntime")  # who runs the network (inference.backends)
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")  # at which precision a CPU runtime runs it


class InferenceSettingsError(MedsegError, ValueError):
    """Tile size, overlap, batch size or another inference setting cannot work."""


@dataclass
class TileSettings:
    """Everything that decides how an image is run through a model."""

    tile_size: int = 256
    overlap: int = 64  # px shared by neighbouring tiles; the blend hides seams inside it
    batch_size: int = 4  # tiles per forward pass; halves by itself on GPU out-of-memory
    blend: str = "gaussian"  # gaussian | cosine (a raised-cosine taper)
    tta: bool = False  # test-time augmentation: mean over the 4 horizontal/vertical flips (4x the work)
    # H&E: a tile whose pixels are (almost) all near-white glass is background without running
    # the model. Only for RGB images and 3-channel models; fluorescence has dark backgrounds.
    skip_background: bool = True
    background_level: float = 0.85  # a pixel is glass when all its channels are >= this (0..1 scale)
    max_tissue_fraction: float = 0.001  # skip a tile with at most this share of non-glass pixels
    amp: bool = True  # CUDA only: autocast to ``amp_dtype``; CPU always runs float32
    amp_dtype: str = "float16"
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPU and GPU
    # the network's input enlarged this much over the model's pixel grid (its maps come back to it);
    # None: the model's own measured choice (``CheckpointMeta.network_zoom``); 1: as trained, fastest
    network_zoom: float | None = None

    def checked(self, multiple_of: int = 1) -> "TileSettings":
        """Self, if every setting can work for a model whose input must be a multiple of ``multiple_of``."""
        if self.tile_size < multiple_of or self.tile_size <= 0 or self.tile_size % multiple_of:
            raise InferenceSettingsError(
                f"Tile size {self.tile_size} must be a positive multiple of {multiple_of} for this model."
            )
        if not 0 <= self.overlap < self.tile_size:
            raise InferenceSettingsError(
                f"Overlap {self.overlap} must be at least 0 and smaller than the tile ({self.tile_size})."
            )
        if self.batch_size < 1:
            raise InferenceSettingsError(f"Batch size must be at least 1, got {self.batch_size}.")
        if self.blend not in BLENDS:
            raise InferenceSettingsError(f"Unknown blend '{self.blend}'; choose one of: {', '.join(BLENDS)}.")
        if self.amp_dtype not in AMP_DTYPES:
            raise InferenceSettingsError(f"Unknown AMP dtype '{self.amp_dtype}'; choose one of: {', '.join(AMP_DTYPES)}.")
        if not 0.0 < self.background_level <= 1.0:
            raise InferenceSettingsError(f"background_level must be in (0, 1], got {self.background_level}.")
        if self.network_zoom is not None and not is_network_zoom(self.network_zoom):
            raise InferenceSettingsError(f"Network zoom must be a number from {MIN_NETWORK_ZOOM:g} to "
                                         f"{MAX_NETWORK_ZOOM:g}, got {self.network_zoom!r}.")
        if not 0.0 <= self.max_tissue_fraction < 1.0:
            raise InferenceSettingsError(f"max_tissue_fraction must be in [0, 1), got {self.max_tissue_fraction}.")
        return self
