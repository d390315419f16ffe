"""The step-generator protocol shared by every long-running piece of work.

Long work (tiled inference, the watershed, threshold tuning) is written as a generator that
yields ``(done, total)`` after each step and *returns* its result. A driver reports progress
and polls for cancel between steps; closing the generator abandons the work, so nothing
half-made is ever returned. ``run_steps`` is the one driver; ``chain`` puts two phases of work
on one progress scale.
"""

from __future__ import annotations

from typing import Callable, Generator

from .errors import MedsegError

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
Steps = Generator[tuple[int, int], None, object]


class Cancelled(MedsegError):
    """The caller asked to stop; no result was produced."""


def run_steps(steps: Steps, progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None):
    """Drive a step generator to its return value, reporting progress and polling for cancel."""
    while True:
        if should_cancel is not None and should_cancel():
            steps.close()
            raise Cancelled("Cancelled.")
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def offset_steps(steps: Steps, before: int, after: int):
    """Generator: ``steps`` re-reported as the middle of a larger job, ``before`` steps already
    done and ``after`` still to come once it finishes; returns its value."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        yield before + done, before + total + after


def part_steps(steps: Steps, index: int, part: int, total: int):
    """Generator: ``steps`` re-reported as part ``index`` of a job cut into equal parts of ``part``
    units each (``total`` in all), e.g. one block of a slide; returns its value. The part's own
    total may be known only once it reports, so it is rescaled to ``part`` units."""
    while True:
        try:
            done, count = next(steps)
        except StopIteration as finished:
            return finished.value
        yield index * part + (part - 1) * done // max(count, 1), total


def chain(first: Steps, second_total: int, then: Callable[[object], Steps]):
    """Generator: ``first``, then ``then(first's result)`` (which takes ``second_total`` steps), on
    one progress scale; returns both results. ``first``'s total is known only once it reports."""
    total = 0
    while True:
        try:
            done, total = next(first)
        except StopIteration as finished:
            result = finished.value
            break
        yield done, total + second_total
    second = yield from offset_steps(then(result), total, 0)
    return result, second
