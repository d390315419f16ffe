"""What a network is: the ``ModelConfig`` a checkpoint records and ``build_model`` turns into one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import MedsegError
from .fields import type_errors

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


class ModelConfigError(MedsegError, ValueError):
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
        config = cls(**data)
        wrong = type_errors(config, "model.")
        if wrong:
            raise ModelConfigError(f"Wrong model setting(s): {'; '.join(wrong)}.")
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    def same_network(self, other: "ModelConfig") -> bool:
        """Whether the two describe the same network, whatever encoder weights each run started from
        (a fine-tune of a checkpoint records none: it starts from the checkpoint)."""
        return replace(self, encoder_weights=None) == replace(other, encoder_weights=None)

    @property
    def network_name(self) -> str:
        """'unet/mobilenet_v2'; a custom architecture's without the encoder it does not have
        ('vanilla_unet', not 'vanilla_unet/resnet34': the unused default had read as its encoder)."""
        if self.architecture.lower() in CUSTOM_ARCHITECTURES:
            return f"{self.architecture} ({self.base_channels} base channels, depth {self.depth})"
        return f"{self.architecture}/{self.encoder}"

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


# encoder_depth each smp architecture builds and runs with (deeplabv3plus ignores it: always 5)
ENCODER_DEPTHS = {"unet": (1, 5), "unetplusplus": (2, 5), "fpn": (3, 5)}


def encoder_depth_error(config: ModelConfig) -> str | None:
    """Why ``config.encoder_depth`` cannot work for its architecture, or None. smp's own messages
    came late (after the data were read) or not at all: UNet++ of depth 1 built, then failed in
    its first forward pass with a KeyError ('x_0_-1'), a traceback mid-training."""
    low_high = ENCODER_DEPTHS.get(config.architecture.lower())
    if low_high is None or low_high[0] <= config.encoder_depth <= low_high[1]:
        return None
    return (f"model.encoder_depth {config.encoder_depth} does not work with {config.architecture}: give "
            f"{low_high[0]} to {low_high[1]} (the encoder's downsampling stages; each halves the image).")


def ignored_settings_errors(config: ModelConfig) -> list[str]:
    """Settings ``config``'s architecture would build without a word (a run is refused, not
    misrecorded): decoder dropout 0.5 on an smp U-Net had trained none and recorded 0.5, a
    missing encoder_weights file on vanilla_unet had started from random weights unsaid."""
    arch, default = config.architecture.lower(), ModelConfig()
    errors = []
    if not 0 <= config.dropout < 1:
        errors.append(f"model.dropout must lie in [0, 1), got {config.dropout}")
    if arch in SMP_ARCHITECTURES:
        for name in ("dropout", "base_channels", "depth"):
            if getattr(config, name) != getattr(default, name):
                errors.append(f"model.{name} applies to {' and '.join(CUSTOM_ARCHITECTURES)} only; {arch} (smp) "
                              "has no such setting: remove it")
        if arch in ("deeplabv3plus", "fpn") and config.decoder_channels is not None:
            errors.append(f"model.decoder_channels applies to the U-Net family (unet, unetplusplus), not {arch}")
    elif arch in CUSTOM_ARCHITECTURES:
        for name, what in (("encoder_weights", "encoder weights"), ("decoder_channels", "decoder channels"),
                           ("extra", "smp keyword arguments")):
            if getattr(config, name) not in (None, {}):
                errors.append(f"model.{name}: {arch} has no {what} (it is built from base_channels and depth, "
                              "from random weights): remove it")
    return errors
