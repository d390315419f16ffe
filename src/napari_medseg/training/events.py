"""What a training run tells its caller: progress updates, its result, the error that ends it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedsegError


class TrainingError(MedsegError, RuntimeError):
    """Training cannot start or cannot go on (NaN loss, unusable data, unwritable output)."""


@dataclass
class BatchDone:
    epoch: int
    step: int
    steps: int
    loss: float
    epochs: int = 0  # the run's epochs as it runs (on a GPU a config's ``on_cuda`` may change them)


@dataclass
class EpochDone:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    metrics: dict
    best: bool
    seconds: float
    lr: float = float("nan")
    stop_reason: str = ""  # set on the epoch after which early stopping ends the run


@dataclass
class TrainingDone:
    checkpoint: Path | None
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""
    resume: Path | None = None  # resume.safetensors of the last finished epoch
    best_metrics: dict = field(default_factory=dict)  # validation record of the best epoch
    seed: int = 0
