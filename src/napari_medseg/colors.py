"""Fixed, distinguishable colours for class maps, shared by the checkpoint and the viewer."""

from __future__ import annotations

# Colours for well-known class names, so that e.g. "inflammatory" looks the same
# whichever dataset or model produced it. RGB, 0-255.
KNOWN_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "nucleus": (255, 215, 0),
    "neoplastic": (255, 0, 0),
    "inflammatory": (0, 200, 0),
    "connective": (0, 90, 255),
    "dead": (255, 255, 0),
    "epithelial": (255, 140, 0),
    "other": (200, 0, 200),
    "spindle": (0, 220, 220),
}

# Fallback palette (Okabe-Ito + extras), for classes with other names.
_PALETTE: list[tuple[int, int, int]] = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (120, 120, 120), (170, 255, 195), (128, 0, 0),
]


def class_colors(class_names: list[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class; index 0 (background) is black."""
    colors = []
    spare = iter(_PALETTE * (1 + len(class_names) // len(_PALETTE)))
    for i, name in enumerate(class_names):
        key = name.strip().lower()
        if i == 0:
            colors.append((0, 0, 0))
        elif key in KNOWN_CLASS_COLORS:
            colors.append(KNOWN_CLASS_COLORS[key])
        else:
            colors.append(next(spare))
    return colors
