"""One place that turns a ``ModelConfig`` into a network, with no download ever."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import ARCHITECTURES, SMP_ARCHITECTURES, TESTED_ENCODERS, ModelConfig, ModelConfigError
from .weights import load_local_encoder_weights

if TYPE_CHECKING:  # torch loads with the first model built
    from torch import nn


def build_model(config: ModelConfig) -> nn.Module:
    arch = config.architecture.lower()
    if config.num_classes < 1 or config.in_channels < 1:
        raise ModelConfigError("num_classes and in_channels must be at least 1.")
    if arch == "vanilla_unet":
        from .networks.vanilla_unet import VanillaUNet

        return VanillaUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.dropout)
    if arch == "attention_res_unet":
        from .networks.attention_res_unet import AttentionResUNet

        return AttentionResUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.dropout)
    if arch not in SMP_ARCHITECTURES:
        raise ModelConfigError(f"Unknown architecture '{config.architecture}'. Choose one of: {', '.join(ARCHITECTURES)}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than retry a download
    import segmentation_models_pytorch as smp

    if config.encoder not in smp.encoders.get_encoder_names():
        raise ModelConfigError(f"Unknown encoder '{config.encoder}'. Tested: {', '.join(TESTED_ENCODERS)}.")
    kwargs = dict(config.extra)
    if arch in ("unet", "unetplusplus"):
        if config.decoder_channels is not None:
            kwargs["decoder_channels"] = list(config.decoder_channels)
        elif config.encoder_depth != 5:
            kwargs["decoder_channels"] = [256, 128, 64, 32, 16][-config.encoder_depth:]
    if arch == "fpn":
        # smp's FPN merges its 4 finest pyramid levels, at stride 2**(depth-3), then upsamples
        # by a fixed 4 (right for depth 5 only); match it so output size == input size.
        kwargs.setdefault("upsampling", 2 ** (config.encoder_depth - 3))
    if arch != "deeplabv3plus":
        kwargs["encoder_depth"] = config.encoder_depth
    try:
        model = smp.create_model(
            SMP_ARCHITECTURES[arch], encoder_name=config.encoder, encoder_weights=None,
            in_channels=config.in_channels, classes=config.out_channels, **kwargs,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelConfigError(f"Cannot build {arch} with encoder {config.encoder}: {exc}") from exc
    if config.encoder_weights:
        load_local_encoder_weights(model, config.encoder_weights)
    return model
