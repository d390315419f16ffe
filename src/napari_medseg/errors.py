"""The root of every error napari-medseg raises on purpose.

Faces (the CLI, the widgets, the web app) show a ``MedsegError``'s message as it is: it names
the file, setting or value at fault. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedsegError(Exception):
    """A problem the user can fix: bad input, a setting that cannot work, a missing file."""
