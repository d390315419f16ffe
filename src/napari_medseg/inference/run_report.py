"""What one run did (tiles, passes, backend, precision): plain data, no runtime needed to read it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunReport:
    """What one run did, for logs, status lines and tests."""

    tiles: int = 0
    skipped_background: int = 0
    forward_passes: int = 0
    batch_size: int = 0  # after any out-of-memory halving
    out_of_memory_retries: int = 0
    backend: str = "torch"  # who ran the network (``backends``)
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)
