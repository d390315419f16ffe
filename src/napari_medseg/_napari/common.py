"""What every widget shares: how a failure reaches the user, and how work leaves the GUI thread.

Every widget takes the viewer as ``napari_viewer``: napari passes its viewer (behind a proxy
that hides private attributes) to a parameter of that name, or to one annotated
``napari.viewer.Viewer``. It compares annotations as text, so under ``from __future__ import
annotations`` a quoted one reads "'napari.viewer.Viewer'", is missed, and the Plugins menu
entry fails with "missing 1 required positional argument: 'viewer'".
"""

from __future__ import annotations

from typing import Callable

from ..errors import MedsegError


class WidgetInputError(MedsegError, ValueError):
    """A widget's inputs cannot work (nothing chosen, a missing file); the message says what to do."""


def report_error(status, error: BaseException | str, prefix: str = "") -> str:
    """Tell the user why an action failed; returns what follows ``'Error: '`` on ``status``.

    A ``MedsegError`` (or a plain message) is the user's to fix: its message goes on the status
    line and into a notification, as it is. Anything else is a bug: napari's notification
    carries its traceback, and the status line names it.
    """
    from napari.utils.notifications import notification_manager, show_error

    if isinstance(error, (str, MedsegError)):
        message = f"{prefix}{error}"
        status.value = f"Error: {message}"
        show_error(message)
        return message
    message = f"{prefix}{type(error).__name__}: {error}"
    status.value = f"Error: {message} (unexpected: the traceback is in napari's notifications)"
    notification_manager.receive_error(type(error), error, error.__traceback__)
    return message


def start_worker(work: Callable, on_error: Callable[[BaseException], None], **slots: Callable):
    """Run ``work`` (a function or a generator function) in a napari thread worker, started.

    ``on_error`` gets every exception (napari would otherwise re-raise it as well, showing a
    user's mistake as a traceback); ``slots`` connect the worker's other signals by name
    (``yielded``, ``returned``, ``aborted``, ``finished``).
    """
    from napari.qt.threading import create_worker

    return create_worker(work, _connect={"errored": on_error, **slots})


def export_target(path_widget, given=None, confirm: Callable[[str], bool] | None = None):
    """Where an export goes: ``given``, else the path in ``path_widget``, else one the user picks
    in a save dialog; ``None`` when they cancel, or decline to replace an existing file.

    A relative path is taken from the home folder, not from wherever napari was started.
    """
    from pathlib import Path

    text = str(given or path_widget.value or "").strip()
    if text in ("", "."):
        from qtpy.QtWidgets import QFileDialog

        text, _ = QFileDialog.getSaveFileName(None, "Export to", str(Path.home()), path_widget.filter or "")
        if not text:
            return None
        path_widget.value = text  # the dialog itself asked before replacing a file
        return Path(text)
    target = Path(text).expanduser()
    if not target.is_absolute():
        target = Path.home() / target
    if target.exists() and not (confirm or confirm_replace)(str(target)):
        return None
    return target


def confirm_replace(path: str) -> bool:
    """Ask before replacing a file (a modal question; tests replace this function)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(None, "Replace file?", f"{path} exists. Replace it?")
    return answer == QMessageBox.StandardButton.Yes

# a tall (scrollable) dock asks for no more height than this, so docks share a 1000 px screen
SCROLL_MIN_HEIGHT = 200
