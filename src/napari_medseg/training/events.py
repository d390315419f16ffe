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
class DataSplit:
    """How the images were split, sent once before the first batch: one row per set (a mixed
    run's datasets; one unnamed row otherwise) with its training images and source images and its
    validation images and held-out source images; ``note``: a split that looks wrong, said before
    hours of training go into it."""
    sets: list[dict]  # {"name", "train_images", "train_sources", "val_images", "val_sources": [names]}
    note: str = ""

    def lines(self) -> list[str]:
        """In words, a line per set: what trains and which source images validate."""
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        lines = []
        for row in self.sets:
            held = [g.rsplit("/", 1)[-1] for g in row["val_sources"]]
            shown = ", ".join(held[:6]) + (f", ... ({len(held)} in all)" if len(held) > 6 else "")
            lines.append(f"{row['name'] + ': ' if row['name'] else ''}training on {count(row['train_images'], 'image')} "
                         f"of {count(row['train_sources'], 'source image')}; validating on "
                         + (f"{count(row['val_images'], 'image')} of {len(held)} ({shown})" if held else "none"))
        return lines


@dataclass
class StartScored:
    """Sent around the validation of the start model that ``monitor: val_least_gain_over_start``
    compares every epoch with: first with ``note`` saying it is being scored (``scores`` None),
    then with its figures in words and as validation metrics (``scores``)."""
    note: str
    scores: dict | None = None


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
