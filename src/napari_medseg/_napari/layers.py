"""How class maps become napari Labels layers: named classes, one fixed colour each."""

from __future__ import annotations

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
