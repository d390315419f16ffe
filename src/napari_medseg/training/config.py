"""Training configuration: one dataclass, loaded from YAML, saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..models.registry import ModelConfig


class TrainConfigError(ValueError):
    """A training configuration is incomplete or contradicts itself."""


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=list)  # dataset folders, merged (same classes)
    val_fraction: float = 0.15  # of source images (split by image, never by patch)
    crop_size: int = 256
    crops_per_image: int = 1  # random crops drawn from each training image per epoch
    group_pattern: str = r"^(.*)_\d+$"  # stem -> source image; patches of one image stay on one side


@dataclass
class AugmentConfig:
    flip: bool = True
    rotate90: bool = True
    scale: tuple[float, float] | None = (0.8, 1.25)
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.04
    sharpness: float = 0.0  # probability of a random sharpness change


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init_checkpoint: str | None = None  # fine-tune: start from these weights (its model config wins)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: str = "ce_dice"  # ce | weighted_ce | dice | ce_dice | focal
    class_weights: list[float] | str | None = None  # explicit list, or "auto" (from pixel frequencies)
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    epochs: int = 30
    batch_size: int = 8
    patience: int = 0  # early stop after this many epochs without improvement; 0 = off
    min_delta: float = 0.0
    monitor: str = "val_loss"  # val_loss (lower is better) or a metric name such as val_miou
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    out_dir: str = "runs/model"
    save_half: bool = False  # store fp16 weights in the checkpoint
    model_card: str = ""
    pixel_size_um: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        sections = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TrainConfigError(f"Unknown training setting(s): {', '.join(sorted(unknown))}.")
        for key, section in sections.items():
            if key in data and isinstance(data[key], dict):
                sub_known = {f.name for f in fields(section)}
                bad = set(data[key]) - sub_known
                if bad:
                    raise TrainConfigError(f"Unknown {key} setting(s): {', '.join(sorted(bad))}.")
                data[key] = section(**data[key])
        cfg = cls(**data)
        if isinstance(cfg.data.dataset, str):
            cfg.data.dataset = [cfg.data.dataset]
        if cfg.augment.scale is not None:
            cfg.augment.scale = tuple(cfg.augment.scale)
        return cfg


def _parse_value(text: str):
    return yaml.safe_load(text)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"Config file '{path}' does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping of settings.")
        # Relative dataset paths are relative to the config file's folder's parent project,
        # i.e. to the current directory, as users type them.
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"--set expects key=value, got '{item}'.")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return TrainConfig.from_dict(data)
