"""Training and fine-tuning (headless; the napari widget and the CLI drive it)."""

from .config import TrainConfig, TrainConfigError, load_train_config
from .trainer import BatchDone, EpochDone, TrainingDone, TrainingError, train

__all__ = ["BatchDone", "EpochDone", "TrainConfig", "TrainConfigError", "TrainingDone", "TrainingError",
           "load_train_config", "train"]
