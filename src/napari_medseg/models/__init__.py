"""Model registry, checkpoints and the shipped default model."""

from pathlib import Path

from .checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from .config import ARCHITECTURES, TESTED_ENCODERS, ModelConfig, ModelConfigError
from .registry import build_model
from .weights import CheckpointError

DEFAULT_MODEL_PATH = Path(__file__).parent / "default" / "default.safetensors"


def resolve_model_path(name_or_path: str) -> Path:
    """``'default'`` -> the shipped model; anything else is a checkpoint path."""
    if name_or_path in ("default", "", None):
        if not DEFAULT_MODEL_PATH.is_file():
            raise CheckpointError(f"The default model is missing from the package ({DEFAULT_MODEL_PATH}).")
        return DEFAULT_MODEL_PATH
    return Path(name_or_path).expanduser()


__all__ = [
    "ARCHITECTURES", "CheckpointError", "CheckpointMeta", "DEFAULT_MODEL_PATH", "ModelConfig",
    "ModelConfigError", "TESTED_ENCODERS", "build_model", "load_checkpoint", "read_meta",
    "resolve_model_path", "save_checkpoint",
]
