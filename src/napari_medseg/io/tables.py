"""Tables (columns of equal length) written as CSV."""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path

import numpy as np

from .images import atomic_write


def csv_row(values) -> list:
    """One CSV row: floats to 9 significant digits (a centroid at x 121002.818 of a wide slide keeps
    its thousandths; 6 had rounded it to the pixel), anything else as it is."""
    return [f"{v:.9g}" if isinstance(v, (float, np.floating)) else v for v in values]


def write_csv(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    """Write columns as CSV atomically (temp file, then rename)."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    names = list(columns)
    writer.writerow(names)
    for row in zip(*(columns[n] for n in names)):
        writer.writerow(csv_row(row))
    path = Path(path)
    # the writer's own line ends as they are (Windows would turn each "\r\n" into "\r\r\n")
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8", newline=""))
    return path
