"""Training and fine-tuning (headless; the napari widget and the CLI drive it).

The trainer (and torch with it) loads on first use of ``train``: the Train widget opens without
it and trains in a process of its own (``process``)."""

from .config import TrainConfig, TrainConfigError, load_train_config
from .events import BatchDone, DataSplit, EpochDone, StartScored, TrainingDone, TrainingError

__all__ = ["BatchDone", "DataSplit", "EpochDone", "StartScored", "TrainConfig", "TrainConfigError", "TrainingDone", "TrainingError",
           "load_train_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
