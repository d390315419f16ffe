"""SIGTERM as an exception, so that every ``finally`` and temp-file cleanup runs."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every ``finally`` and temp-file cleanup runs."""


def on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()
