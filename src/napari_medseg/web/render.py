"""Pictures for the browser: class colours and nucleus outlines over the image, error maps, legends."""

from __future__ import annotations

import html

import numpy as np

from ..evaluation.error_maps import ERROR_COLORS, ERROR_NAMES, WRONG_CLASS


def blend(image: np.ndarray, labels: np.ndarray, colors: dict[int, tuple], opacity: float) -> np.ndarray:
    """``image`` (uint8 RGB) with each label value painted in its colour at ``opacity``."""
    out = image.astype(np.float32)
    for value, rgb in colors.items():
        where = labels == value
        if value and where.any():
            out[where] = (1 - opacity) * out[where] + opacity * np.asarray(rgb[:3], np.float32)
    return np.round(out).astype(np.uint8)


def enlarged(picture: np.ndarray, target: int = 512) -> np.ndarray:
    """Small pictures repeated pixel by pixel up to about ``target`` px, so outlines stay visible."""
    factor = max(1, target // max(picture.shape[:2]))
    return picture if factor == 1 else picture.repeat(factor, 0).repeat(factor, 1)


def class_overlay(image: np.ndarray, class_map: np.ndarray, instances: np.ndarray, colors: list,
                  opacity: float = 0.4) -> np.ndarray:
    """Classes filled at ``opacity`` and every nucleus outlined in its class colour (always
    opaque, so touching nuclei stay apart even with the fill turned off)."""
    from skimage.segmentation import find_boundaries

    palette = {i: tuple(c) for i, c in enumerate(colors)}
    out = blend(image, class_map, palette, opacity)
    edges = find_boundaries(instances, mode="inner") & (class_map > 0)
    out[edges] = np.asarray(colors, np.uint8)[class_map[edges]][:, :3]
    return out


def error_overlay(image: np.ndarray, errors: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    return blend(image, errors, ERROR_COLORS, opacity)


def legend_html(entries: list[tuple[str, tuple]]) -> str:
    """A row of colour swatches with their names."""
    items = "".join(
        f'<span style="display:inline-flex;align-items:center;margin-right:14px">'
        f'<span style="width:14px;height:14px;border-radius:3px;margin-right:5px;'
        f'background:rgb({int(c[0])},{int(c[1])},{int(c[2])})"></span>{html.escape(name)}</span>'
        for name, c in entries)
    return f'<div class="medseg-legend">{items}</div>'


def class_legend(classes: list[str], colors: list) -> str:
    return legend_html(list(zip(classes[1:], colors[1:])))


def error_legend(classes_merged: bool = False) -> str:
    """The TP / FP / FN colours; 'wrong class' only where classes were compared (with the classes
    merged into 'nucleus' no pixel can be one, and the swatch had suggested otherwise)."""
    kinds = [k for k in sorted(ERROR_NAMES) if not (classes_merged and k == WRONG_CLASS)]
    return legend_html([(ERROR_NAMES[k], ERROR_COLORS[k]) for k in kinds])
