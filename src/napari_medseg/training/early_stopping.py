"""Early-stopping rules, each a small state machine fed one monitored value per epoch.

* ``PatienceStop``: stop after ``patience`` epochs without an improvement larger than
  ``min_delta`` (the PanNuke reports: patience 12 and 5 on validation loss).
* ``QuadraticStop``: the EBHI rule. Through the last ``window`` losses fit
  ``q(t) = a t^2 + b t + c`` constrained to pass through the first and the last of them
  (least squares for the one free coefficient over the points in between). Its slope at
  the current epoch, ``q'(t_now)``, estimates the loss change per epoch. An epoch counts
  as *flat* when the fitted decrease ``-q'(t_now)`` is below ``threshold`` (so a rising
  loss counts too). Stop when more than ``patience`` consecutive epochs are flat, counting
  only epochs from ``start`` on (with window 10 and start 10, the first epoch with a full
  window). Both rules keep their state as plain JSON for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import TrainConfigError


def quadratic_slope(values: list[float]) -> float:
    """Slope at the last point of the quadratic through ``values`` with the first and last fixed.

    With ``t = 0..n-1``, ``L = n-1``: ``q(t) = v0 + (vL - v0) t / L + a t (t - L)``;
    ``a`` minimises the squared error over the inner points; ``q'(L) = (vL - v0)/L + a L``.
    """
    n = len(values)
    if n < 3:
        raise TrainConfigError("A constrained quadratic fit needs at least 3 values (quadratic_stop.window).")
    last = n - 1
    v0, vl = float(values[0]), float(values[-1])
    num = den = 0.0
    for t in range(1, last):
        g = t * (t - last)
        residual = float(values[t]) - (v0 + (vl - v0) * t / last)
        num += g * residual
        den += g * g
    a = num / den
    return (vl - v0) / last + a * last


@dataclass
class PatienceStop:
    patience: int
    min_delta: float = 0.0
    higher_is_better: bool = False
    best: float | None = None
    stale: int = 0

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        if self.higher_is_better:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, value: float) -> tuple[bool, bool]:
        """(improved, stop)."""
        better = self.improved(value)
        if better:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return better, bool(self.patience) and self.stale >= self.patience

    def reason(self, monitor: str) -> str:
        return f"no improvement of {monitor} by more than {self.min_delta} for {self.patience} epochs"

    def state(self) -> dict:
        return asdict(self)


@dataclass
class QuadraticStop:
    window: int = 10
    threshold: float = 1e-3
    patience: int = 5
    start: int = 10
    losses: list[float] = field(default_factory=list)
    flat: int = 0
    slopes: list[float] = field(default_factory=list)

    def update(self, epoch: int, loss: float) -> bool:
        """Feed epoch ``epoch``'s (1-based) loss; True when training should stop."""
        self.losses.append(float(loss))
        if len(self.losses) < self.window or epoch < self.start:
            return False
        slope = quadratic_slope(self.losses[-self.window:])
        self.slopes.append(slope)
        self.flat = self.flat + 1 if -slope < self.threshold else 0
        return self.flat > self.patience

    def reason(self) -> str:
        return (f"quadratic fit of the last {self.window} losses: decrease per epoch below {self.threshold} "
                f"for {self.flat} epochs (more than {self.patience})")

    def state(self) -> dict:
        return asdict(self)
