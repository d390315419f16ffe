"""One place that turns a ``ModelConfig`` into a network, with no download ever."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

# smp architectures we expose, by our config name.
SMP_ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "deeplabv3plus": "DeepLabV3Plus",
    "fpn": "FPN",
}
CUSTOM_ARCHITECTURES = ("vanilla_unet", "attention_res_unet")
ARCHITECTURES = tuple(SMP_ARCHITECTURES) + CUSTOM_ARCHITECTURES
# Encoders from the reports, tested to build offline. Any other smp encoder name works too.
TESTED_ENCODERS = ("resnet18", "resnet34", "resnet50", "vgg19", "densenet121", "mobilenet_v2", "efficientnet-b0")


class ModelConfigError(ValueError):
    """A model configuration names something we cannot build."""


@dataclass
class ModelConfig:
    architecture: str = "unet"
    encoder: str = "resnet34"  # ignored by the custom architectures
    in_channels: int = 3
    num_classes: int = 2
    encoder_depth: int = 5
    decoder_channels: list[int] | None = None  # smp U-Net family; None = smp default
    base_channels: int = 32  # custom architectures
    depth: int = 4  # custom architectures
    dropout: float = 0.0  # decoder dropout (custom architectures)
    encoder_weights: str | None = None  # path to a local .safetensors of encoder weights (no pickles), never a hub name
    # one more output channel after the classes: each nucleus's distance to its own edge, scaled
    # to [0, 1] (sigmoid), whose peaks seed the watershed that separates touching nuclei
    distance_head: bool = False
    extra: dict = field(default_factory=dict)  # further keyword arguments for smp

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelConfigError(f"Unknown model setting(s): {', '.join(sorted(unknown))}.")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_channels(self) -> int:
        """Network outputs: one logit per class, then the distance map's logit if it has one."""
        return self.num_classes + int(self.distance_head)

    @property
    def output_stride(self) -> int:
        """Input sides must be multiples of this."""
        arch = self.architecture.lower()  # build_model accepts any case, so must this
        if arch in CUSTOM_ARCHITECTURES:
            return 2**self.depth
        return 2**self.encoder_depth if arch != "deeplabv3plus" else 16


def _load_local_encoder_weights(model: nn.Module, path: str) -> None:
    from .checkpoint import read_state_dict

    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise ModelConfigError(
            f"encoder_weights must be a local file (no downloads); '{path}' does not exist."
        )
    state = read_state_dict(file)
    # Match by name ourselves: smp encoders override load_state_dict (returning None, some
    # without ``strict``), and a file may hold extra tensors (classifier, deeper stages).
    own = model.encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ModelConfigError(f"{file.name}: none of its tensors match the encoder's parameters.")
    wrong = [k for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        raise ModelConfigError(
            f"{file.name}: {len(wrong)} tensor(s) have the wrong shape for encoder '{model.encoder.__class__.__name__}' "
            f"(e.g. '{wrong[0]}': {tuple(matched[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); weights of another encoder?"
        )
    nn.Module.load_state_dict(model.encoder, matched, strict=False)


def build_model(config: ModelConfig) -> nn.Module:
    arch = config.architecture.lower()
    if config.num_classes < 1 or config.in_channels < 1:
        raise ModelConfigError("num_classes and in_channels must be at least 1.")
    if arch == "vanilla_unet":
        from .vanilla_unet import VanillaUNet

        return VanillaUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.dropout)
    if arch == "attention_res_unet":
        from .attention_res_unet import AttentionResUNet

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
        _load_local_encoder_weights(model, config.encoder_weights)
    return model
