"""What the options take: argparse value types, each saying what it expected."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


NO_PIXEL_SIZE = "none"  # --pixel-size none: take every image at the model's pixel size


def _number_or_word(text: str, word: str, accept, expected: str) -> float | str:
    """An option that takes a number for which ``accept(number)`` holds, or ``word``."""
    if text == word:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected} or '{word}'; got {text!r}")
    return value


def pixel_size(text: str) -> float | str:
    """``--pixel-size``: µm per pixel a microscope gives (not a magnification: 100 would upscale a
    thing 400-fold for hours), or 'none'."""
    from ..io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM

    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    return _number_or_word(text, NO_PIXEL_SIZE, lambda v: low <= v <= high,
                           f"µm per pixel from {low} to {high} "
                           "(e.g. 0.5 for 20x, 0.25 for 40x; not the magnification)")


def foreground_threshold(text: str) -> float | str:
    """``--foreground-threshold``: a probability strictly between 0 and 1, or 'argmax'."""
    from ..inference.batch import ARGMAX

    return _number_or_word(text, ARGMAX, lambda v: 0 < v < 1, "a number between 0 and 1")


def class_weights(text: str) -> list[float]:
    """``--class-weights``: 'none' (``[]``) or comma-separated numbers above 0."""
    if text == "none":
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers above 0, comma-separated (one per class), or 'none'; "
                                         f"got {text!r}")
    return values


def count(text: str) -> int:
    """A whole number of at least 0 (pixels, tiles)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 0, not '{text}'")
    return value


def positive(text: str) -> int:
    """A whole number of at least 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not '{text}'")
    return value


def positive_float(text: str) -> float:
    """A number above 0 (minutes, say)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"takes a number above 0, not '{text}'")
    return value


def port(text: str) -> int:
    """A TCP port to listen on."""
    value = count(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"takes a port from 1 to 65535, not '{text}'")
    return value


def checkpoint_file(text: str) -> str:
    """``--out`` of a command that writes a checkpoint: a ``.safetensors`` file (``avdir/`` had
    become a file named ``avdir``, and ``x.pt`` a safetensors file under a pickle's name)."""
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the checkpoint file to write, "
                                         f"e.g. {Path(text) / 'model.safetensors'}")
    if Path(text).suffix.lower() != ".safetensors":
        raise argparse.ArgumentTypeError(f"{text}: checkpoints are written as safetensors files; name it "
                                         f"{Path(text).with_suffix('.safetensors').name}")
    return text


def name_list(text: str) -> list[str]:
    """``--classes``: comma-separated class names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no class: '{text}'")
    return names


def group_list(text: str) -> list[str]:
    """``--groups``: comma-separated source image names."""
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        raise argparse.ArgumentTypeError(f"names no source image: '{text}'")
    return groups


def xy(text: str) -> tuple[float, float]:
    """``--origin X,Y``: two numbers."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers, e.g. 12000,8000); got {text!r}")
    return x, y
