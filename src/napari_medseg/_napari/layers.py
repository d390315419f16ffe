"""How class maps become napari Labels layers: named classes, one fixed colour each."""

from __future__ import annotations

from html import escape

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from ..colors import class_colors

METADATA_KEY = "medseg"


def class_colormap(colors: list) -> DirectLabelColormap:
    """Background transparent; a colour of ``None`` hides that class."""
    color_dict = {None: np.zeros(4), 0: np.zeros(4)}
    for i, rgb in enumerate(colors[1:], start=1):
        color_dict[i] = np.zeros(4) if rgb is None else np.array([*(np.asarray(rgb, float) / 255.0), 1.0])
    return DirectLabelColormap(color_dict=color_dict)


def class_labels_kwargs(name: str, classes: list[str], colors: list | None = None, **extra) -> dict:
    """Keyword arguments for ``add_labels``/layer tuples of a class map."""
    colors = [list(c) for c in (colors or class_colors(classes))]
    return {
        "name": name,
        "colormap": class_colormap(colors),
        "features": {"index": list(range(len(classes))), "class": list(classes)},
        "metadata": {METADATA_KEY: {"kind": "classes", "classes": list(classes), "colors": colors}},
        **extra,
    }


def instance_labels_kwargs(name: str, classes: list[str] | None = None, colors: list | None = None,
                           instance_classes=None, **extra) -> dict:
    """Keyword arguments for an instance map's layer; with ``classes`` and ``instance_classes``
    (``[id] -> class index``, e.g. the majority vote of a class map) its GeoJSON export names
    each nucleus's class. The table is what the nuclei were when made: ids painted later get none."""
    info: dict = {"kind": "instances"}
    if classes is not None and instance_classes is not None:
        info.update(classes=list(classes), colors=[list(c) for c in (colors or class_colors(classes))],
                    instance_classes=np.asarray(instance_classes, np.int64))
    return {"name": name, "metadata": {METADATA_KEY: info}, **extra}


def layer_kind(layer) -> str | None:
    """What this plugin recorded a layer to be ("classes", "instances", "errors", ...), if anything."""
    return getattr(layer, "metadata", {}).get(METADATA_KEY, {}).get("kind")


def image_layers(viewer) -> list:
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image)]


def labels_layers(viewer, exclude: tuple[str, ...] = ()) -> list:
    """The viewer's Labels layers, without those of the kinds in ``exclude``."""
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels) and layer_kind(layer) not in exclude]


def layer_classes(layer) -> list[str] | None:
    """Class names recorded on a Labels layer by this plugin, if any."""
    info = getattr(layer, "metadata", {}).get(METADATA_KEY, {})
    return list(info["classes"]) if info.get("kind") == "classes" and info.get("classes") else None


def image_kwargs(name: str, image: np.ndarray, **extra) -> dict:
    rgb = image.ndim >= 3 and image.shape[-1] == 3
    return {"name": name, "rgb": rgb, **extra}


def placement(layer) -> dict:
    """The ``scale`` and ``translate`` of ``layer``'s last two (y, x) axes, for a 2-D result of it,
    so that results line up with their image however it was placed."""
    return {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}


def pixel_size_um(layer) -> float | None:
    """The side of a pixel in µm where the layer says so: square, non-unit ``scale`` (napari's
    world units, taken as µm) or ``metadata['pixel_size_um']``; else ``None``."""
    size = getattr(layer, "metadata", {}).get("pixel_size_um")
    if size:
        return float(size)
    sy, sx = (float(s) for s in layer.scale[-2:])
    return sy if sy == sx and sy != 1.0 else None


def legend_html(classes: list[str], colors: list | None = None) -> str:
    """A one-paragraph legend, a coloured square and the name of each foreground class (rich text
    for a Qt label; it wraps with the dock)."""
    colors = colors or class_colors(classes)
    items = []
    for name, rgb in zip(classes[1:], colors[1:]):
        if rgb is None:
            continue
        hex_colour = "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))
        items.append(f'<span style="color:{hex_colour}; font-size:large">&#9632;</span>&nbsp;{escape(name)}')
    return " &nbsp; ".join(items)


def wrapping_label(**kwargs):
    """A magicgui Label whose text wraps inside the dock rather than widening it."""
    from magicgui.widgets import Label
    from qtpy.QtWidgets import QSizePolicy

    label = Label(**kwargs)
    label.native.setWordWrap(True)
    policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
    policy.setHeightForWidth(True)  # as tall as its wrapped lines need
    label.native.setSizePolicy(policy)
    label.native.setMinimumWidth(50)
    return label
