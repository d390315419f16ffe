"""How messages say a count: ``'1 image'``, ``'2 images'``, never ``'1 image(s)'``."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """The count with its noun in the right number (``plural`` where adding an s is wrong)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
