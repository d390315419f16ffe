"""A run's progress from epoch to epoch: history, best epoch, the early-stopping rules' state.

It is what a resume file restores besides weights, optimiser and random states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import LEAST_GAIN_MONITOR, TrainConfig, TrainConfigError
from .early_stopping import PatienceStop, QuadraticStop
from .events import TrainingError

WORST_SET = "worst_set_"
LEAST_GAIN = LEAST_GAIN_MONITOR.removeprefix("val_")  # the figure each epoch records
GAIN_FIGURES = ("nucleus_dice", "bpq")  # what the shipping rule compares, set by set


def needs_start_scores(monitor: str) -> bool:
    return monitor == LEAST_GAIN_MONITOR


def least_gain(metrics: dict, start: dict) -> float:
    """The smallest gain of any validation set's nucleus Dice or bPQ over ``start`` (the start
    model's validation metrics, of the same form): negative where some set lost; NaN where
    nothing is comparable."""
    def by_set(record: dict) -> dict:
        return record.get("sets") or {"": record}

    now, before = by_set(metrics), by_set(start)
    gains = [now[name][figure] - before[name][figure]
             for name in now if name in before for figure in GAIN_FIGURES
             if math.isfinite(now[name].get(figure, math.nan)) and math.isfinite(before[name].get(figure, math.nan))]
    return float(min(gains)) if gains else math.nan


def monitor_value(monitor: str, val_loss: float, metrics: dict) -> float:
    """The monitored number of one epoch (``val_loss`` or a validation metric). ``val_worst_set_X``:
    the lowest of the validation sets' ``X`` (a run with one set: its ``X``)."""
    if monitor == "val_loss":
        return val_loss
    key = monitor.removeprefix("val_")
    if key.startswith(WORST_SET) and metrics.get("sets"):
        figure = key.removeprefix(WORST_SET)
        values = [s[figure] for s in metrics["sets"].values() if math.isfinite(s.get(figure, math.nan))]
        if not values:
            raise TrainingError(f"monitor '{monitor}' is undefined: no validation set has a finite {figure}.")
        return float(min(values))
    key = key.removeprefix(WORST_SET)
    if key not in metrics:
        raise TrainConfigError(f"monitor '{monitor}' is not a validation metric ({', '.join(sorted(metrics))}).")
    if key == LEAST_GAIN and not math.isfinite(metrics[key]):
        raise TrainingError(f"monitor '{monitor}' is undefined: neither the start model nor this epoch has a "
                            "finite nucleus Dice or bPQ on the same validation set.")
    if key == "bpq" and not math.isfinite(metrics[key]):  # no validation image has a nucleus: never defined
        raise TrainingError(f"monitor '{monitor}' is undefined: the validation images hold no nucleus. "
                            "Choose another monitor or other validation images.")
    return float(metrics[key])


@dataclass
class Progress:
    monitor: str
    patience: PatienceStop
    quadratic: QuadraticStop | None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    next_epoch: int = 1
    reason: str = ""  # why the run ends before its last epoch ("" while it goes on)
    best_value: float | None = None  # the best epoch's monitored value
    start_scores: dict | None = None  # the start model's validation metrics, where the monitor compares with them

    @classmethod
    def start(cls, cfg: TrainConfig, has_validation: bool) -> "Progress":
        monitor = cfg.monitor if has_validation else "val_loss"  # without validation images only a loss
        q = cfg.quadratic_stop
        return cls(monitor, PatienceStop(cfg.patience, cfg.min_delta, higher_is_better=monitor != "val_loss"),
                   QuadraticStop(q.window, q.threshold, q.patience, q.start) if q.enabled else None)

    def restore(self, info: dict) -> None:
        """Continue from a resume file's ``info``."""
        self.history = info["history"]
        self.best_epoch = info["best_epoch"]
        self.start_scores = info.get("start_scores")
        self.next_epoch = info["epoch"] + 1
        best = self.best_record
        self.best_value = monitor_value(self.monitor, best["val_loss"], best) if best else None
        self.patience = PatienceStop(**info["patience"])
        if info.get("quadratic") is not None and self.quadratic is not None:
            self.quadratic = QuadraticStop(**info["quadratic"])
        # a run that stopped early stays stopped: its rules' states say whether one stopped it
        if self.patience.patience and self.patience.stale >= self.patience.patience:
            self.reason = self.patience.reason(self.monitor)
        elif self.quadratic is not None and self.quadratic.flat > self.quadratic.patience:
            self.reason = self.quadratic.reason()

    def resume_state(self) -> dict:
        """What a resume file keeps besides history and best epoch: the stopping rules' states and
        the start model's scores (a resumed run compares with the start, not with its own weights)."""
        return {"patience": self.patience.state(), "quadratic": self.quadratic.state() if self.quadratic else None,
                "start_scores": self.start_scores}

    def add_epoch(self, record: dict, metrics: dict) -> bool:
        """Record one validated epoch and feed the stopping rules; True when it is the best so far."""
        epoch, val_loss = record["epoch"], record["val_loss"]
        value = monitor_value(self.monitor, val_loss, metrics)
        self.history.append(record)
        _, patience_stop = self.patience.update(value)
        # the best epoch is the best monitored value, however small its lead: min_delta only
        # decides what counts as progress for early stopping
        improved = PatienceStop(0, 0.0, self.patience.higher_is_better, self.best_value).improved(value)
        if improved:
            self.best_epoch, self.best_value = epoch, value
        if patience_stop:
            self.reason = self.patience.reason(self.monitor)
        if self.quadratic is not None and self.quadratic.update(epoch, val_loss) and not self.reason:
            self.reason = self.quadratic.reason()
        return improved

    @property
    def best_record(self) -> dict:
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})
