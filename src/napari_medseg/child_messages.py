"""JSON-line messages between a caller and the child process it runs work in (a slide run, a
training run): the child's side keeps stdout for the messages alone, the caller's reads them on
a thread, and a crash is reported with the end of the child's log."""

from __future__ import annotations

import json
import os
import queue
import sys
from pathlib import Path
from typing import Callable

LOG_TAIL_CHARS = 2000  # of the child's log, in the message of a crash


def message_sender() -> Callable[..., None]:
    """In the child: ``send(**message)`` writes one JSON line to the real stdout; anything else
    printed (by us or by a library) goes to stderr, the log, never into the messages."""
    messages = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return lambda **message: messages.write(json.dumps(message) + "\n")


def read_messages(stream, inbox: queue.Queue) -> None:
    """In the caller's reader thread: each JSON line of ``stream`` into ``inbox``, then None when it ends."""
    for line in stream:
        try:
            inbox.put(json.loads(line))
        except ValueError:
            continue
    inbox.put(None)


def log_tail(path: Path | None, chars: int = LOG_TAIL_CHARS) -> str:
    """" Its log (PATH) ends: ..." with the last ``chars`` of the child's log; "" without one."""
    try:
        text = path.read_text(errors="replace").strip() if path is not None and path.is_file() else ""
    except OSError:
        return ""
    return f" Its log ({path}) ends: ...{text[-chars:]}" if text else ""
