"""A progress line on the terminal."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str):
        self.label, self.tty, self.t0, self.last = label, sys.stderr.isatty(), time.time(), -1.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done < total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {now - self.t0:.1f}s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
