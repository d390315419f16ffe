"""How class maps become napari Labels layers: named classes, one fixed colour each."""

from __future__ import annotations

from html import escape
from typing import Callable

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from ..colors import class_colors
from .common import WidgetInputError

METADATA_KEY = "medseg"
CLASS_OPACITY = 0.45  # class colours under the nucleus outlines: the stain stays readable
PAINTED_NUCLEUS_RGBA = (1.0, 1.0, 1.0, 1.0)  # ids painted after the vote have no class: white
CLASS_LINK = "class:"  # a legend link's target: "class:<index>"


def _rgba(rgb) -> np.ndarray:
    """napari's colour of a 0-255 RGB class colour; ``None`` (a hidden class) is transparent."""
    return np.zeros(4) if rgb is None else np.array([*(np.asarray(rgb, float)[:3] / 255.0), 1.0])


def class_colormap(colors: list) -> DirectLabelColormap:
    """Background transparent; a colour of ``None`` hides that class."""
    color_dict = {None: np.zeros(4), 0: np.zeros(4)}
    for i, rgb in enumerate(colors[1:], start=1):
        color_dict[i] = _rgba(rgb)
    return DirectLabelColormap(color_dict=color_dict)


def _classified(votes: np.ndarray, n_classes: int) -> np.ndarray:
    """The ids whose vote is a known foreground class."""
    return np.flatnonzero((votes > 0) & (votes < n_classes))


def instance_colormap(votes: np.ndarray, colors: list) -> DirectLabelColormap:
    """Each nucleus in its class's colour (``votes[id]`` = its class index), not a random one;
    ids without a class (painted later) white. One dict entry a nucleus: ~50 ms for 800."""
    palette = [_rgba(rgb) for rgb in colors]
    color_dict = {None: np.array(PAINTED_NUCLEUS_RGBA), 0: np.zeros(4)}
    for nucleus in _classified(votes, len(colors)):
        color_dict[int(nucleus)] = palette[votes[nucleus]]
    return DirectLabelColormap(color_dict=color_dict)


def features_table(columns: dict):
    """A layer's ``features`` as the pandas table napari makes of them: built where the layer's
    keyword arguments are (a worker, ideally), since napari imports pandas on first use, a
    second or more on the GUI thread."""
    import pandas as pd

    return pd.DataFrame(columns)


def instance_features(votes: np.ndarray, classes: list[str]):
    """One row a classified nucleus (``index`` = its id): napari's status bar names the class of
    the nucleus under the cursor."""
    ids = _classified(votes, len(classes))
    return features_table({"index": ids, "class": np.asarray(classes, dtype=object)[votes[ids]]})


def class_labels_kwargs(name: str, classes: list[str], colors: list | None = None, **extra) -> dict:
    """Keyword arguments for ``add_labels``/layer tuples of a class map (half transparent, so
    that the tissue shows through; ``opacity=`` in ``extra`` overrides it)."""
    colors = [list(c) for c in (colors or class_colors(classes))]
    return {
        "name": name,
        "opacity": CLASS_OPACITY,
        "colormap": class_colormap(colors),
        "features": features_table({"index": list(range(len(classes))), "class": list(classes)}),
        "metadata": {METADATA_KEY: {"kind": "classes", "classes": list(classes), "colors": colors}},
        **extra,
    }


NUCLEUS_OUTLINE_PX = 2  # a result's nuclei are outlined over the class colours, not filled


def instance_labels_kwargs(name: str, classes: list[str] | None = None, colors: list | None = None,
                           instance_classes=None, **extra) -> dict:
    """Keyword arguments for an instance map's layer; with ``classes`` and ``instance_classes``
    (``[id] -> class index``, e.g. the majority vote of a class map) each nucleus takes its
    class's colour, the status bar names its class, and its GeoJSON export does too. The table
    is what the nuclei were when made: ids painted later get none (and show white)."""
    info: dict = {"kind": "instances"}
    by_class: dict = {}
    if classes is not None and instance_classes is not None:
        colors = [list(c) for c in (colors or class_colors(classes))]
        votes = np.asarray(instance_classes, np.int64)
        info.update(classes=list(classes), colors=colors, instance_classes=votes)
        by_class = {"colormap": instance_colormap(votes, colors), "features": instance_features(votes, classes)}
    return {"name": name, "metadata": {METADATA_KEY: info}, **by_class, **extra}


def replace_instances(layer, instances: np.ndarray, kwargs: dict) -> None:
    """New nuclei for an instance layer, in place (it keeps its name, place and opacity), with
    the class colours, class names and metadata of ``kwargs`` (``instance_labels_kwargs``): new
    ids would otherwise take the colours and classes of the old ones."""
    # the region it covers stays the same
    layer.metadata = with_origin(kwargs, region_origin(layer.metadata), recorded_polygon(layer.metadata))["metadata"]
    if "colormap" in kwargs:
        layer.features = kwargs["features"]
        layer.colormap = kwargs["colormap"]
    layer.data = instances


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


def _yx_extent(layer) -> np.ndarray:
    """``[[top, left], [bottom, right]]`` of a layer in world units."""
    return np.asarray(layer.extent.world, float)[:, -2:]


def _overlapping(candidates, layers) -> list:
    """Those of ``candidates`` whose extent overlaps any of ``layers``'."""
    def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.all(a[0] <= b[1]) and np.all(b[0] <= a[1]))

    boxes = [_yx_extent(layer) for layer in layers if layer is not None]
    return [layer for layer in candidates if any(overlaps(_yx_extent(layer), box) for box in boxes)]


def labels_under(viewer, layers) -> list:
    """The viewer's shown Labels layers (ground truth, an earlier run's results) that ``layers``,
    about to be added, would be drawn over: their class colours mixed with the new ones
    (spindle cyan over a gold truth read as inflammatory green)."""
    return _overlapping([layer for layer in labels_layers(viewer) if layer.visible], layers)


def images_over(viewer, image, layers) -> list:
    """The viewer's shown Image layers above ``image`` in the layer list that overlap ``layers``
    (its result): they would cover the segmented image, so its nuclei would be drawn over another
    picture (a dataset folder's first image, shown over the hidden one that was segmented)."""
    if image not in viewer.layers:
        return []
    shown = [layer for layer in image_layers(viewer) if layer.visible]
    above = list(viewer.layers)[list(viewer.layers).index(image) + 1:]
    return _overlapping([layer for layer in above if layer in shown], layers)


def hidden_words(layers, under: str) -> str:
    """Which layers were hidden ``under`` something, and how to show them again."""
    them = "it" if len(layers) == 1 else "them"
    return (f"Hidden under {under}: " + ", ".join(f"'{layer.name}'" for layer in layers)
            + f" (tick {them} in the layer list to see {them} again).")


def layer_classes(layer) -> list[str] | None:
    """Class names recorded on a Labels layer by this plugin, if any."""
    info = getattr(layer, "metadata", {}).get(METADATA_KEY, {})
    return list(info["classes"]) if info.get("kind") == "classes" and info.get("classes") else None


def image_kwargs(name: str, image: np.ndarray, **extra) -> dict:
    rgb = image.ndim >= 3 and image.shape[-1] == 3
    return {"name": name, "rgb": rgb, **extra}


def placement(layer, ndim: int = 2) -> dict:
    """The ``scale``, ``translate`` and ``units`` of ``layer``'s last two (y, x) axes, for a 2-D
    result of it, so that results line up with their image however it was placed (and napari
    sees one unit across them: a µm slide and pixel-unit results draw a warning); its affine
    too where it has one (napari's Transform tool moves a layer by its affine, not its translate).
    ``ndim``: of the last that many axes instead, for a result of ``layer``'s own shape (a stack)."""
    where = {"scale": tuple(layer.scale[-ndim:]), "translate": tuple(layer.translate[-ndim:]),
             "units": tuple(str(unit) for unit in layer.units[-ndim:])}
    matrix = np.asarray(layer.affine.affine_matrix)
    axes = list(range(-ndim - 1, 0))  # the rows and columns of those axes, with the translation
    kept = matrix[np.ix_(axes, axes)]
    if not np.allclose(kept, np.eye(ndim + 1)):
        where["affine"] = kept
    return where


def place(layer, where: dict) -> None:
    """Put an existing ``layer`` where ``placement`` says (an affine it lacks: none)."""
    layer.scale, layer.translate = where["scale"], where["translate"]
    if "units" in where:
        layer.units = where["units"]
    layer.affine = where.get("affine", np.eye(len(where["scale"]) + 1))


def in_memory_plane(layer, use: str, under=None, plane: tuple[int, ...] | None = None) -> np.ndarray:
    """``layer``'s pixels, for work on one image held in memory (``use``: what for). A multiscale
    layer (a slide, a slide run's labels) is refused: napari's array of it is its coarsest level,
    so measuring it would silently score a thumbnail. One plane of a stack (Segment's result of a
    PanNuke image) as its 2-D map; of a stack (a fold's ground truth), the plane ``plane`` (its
    index on the stack axes) or else the one that the layer ``under`` (one plane's result) lies
    on, that plane only read."""
    if getattr(layer, "multiscale", False):
        folder = layer.metadata.get(METADATA_KEY, {}).get("results")
        made = (f" Its per-nucleus CSV (µm² areas, classes) and GeoJSON were written by its run in {folder}."
                if folder else "")
        raise WidgetInputError(f"'{layer.name}' is a whole-slide pyramid; {use} works on one image in memory: "
                               f"segment a region of an ordinary image, or open a crop of the slide.{made}")
    data, lead = layer.data, layer.ndim - 2
    if lead > 0 and all(n == 1 for n in data.shape[:lead]):
        return np.asarray(data).reshape(data.shape[lead:])
    if plane is None and lead > 0 and under is not None:
        plane = plane_under(layer, under)
    return np.asarray(data[plane] if plane is not None else data)


def plane_under(stack, layer) -> tuple[int, ...] | None:
    """The index, on the stack axes of ``stack``, of the plane that ``layer`` (one plane of a stack:
    a result of Segment) lies on; ``None`` if ``layer`` is no such plane or lies on none of it."""
    lead = stack.ndim - 2
    if lead <= 0 or layer.ndim != stack.ndim or any(n != 1 for n in layer.data.shape[:layer.ndim - 2]):
        return None
    corner = layer.data_to_world(np.zeros(layer.ndim))
    point = np.asarray(stack.world_to_data(corner), float)[:lead]
    index = tuple(int(round(c)) for c in point)
    if not np.allclose(point, index, atol=1e-3) or any(not 0 <= k < n for k, n in zip(index, stack.data.shape)):
        return None
    return index


def shown_plane(viewer, layer, leading: int) -> tuple[int, ...]:
    """The index, on a stack's ``leading`` axes, of the plane of ``layer`` the viewer shows (its
    sliders' position, within the stack)."""
    point = np.asarray(layer.world_to_data(viewer.dims.point[-layer.ndim:]), float)
    shape = layer.data.shape
    return tuple(int(min(max(round(point[i]), 0), shape[i] - 1)) for i in range(leading))


def plane_placement(layer, plane: tuple[int, ...], where: dict) -> dict:
    """``where`` (a 2-D result's placement on ``layer``) for a result of one ``plane`` of the stack
    ``layer``: one step thick on each stack axis, at that plane, so it shows there only."""
    full = placement(layer, ndim=layer.ndim)
    lead = len(plane)
    scale = tuple(full["scale"][:lead])
    placed = {"scale": scale + tuple(where["scale"]),
              "translate": tuple(t + s * k for t, s, k in zip(full["translate"][:lead], scale, plane))
              + tuple(where["translate"]),
              "units": tuple(full["units"][:lead]) + tuple(where["units"])}
    if "affine" in full:
        placed["affine"] = full["affine"]
    return placed


def with_origin(kwargs: dict, origin: tuple[int, int] | None, polygon=None) -> dict:
    """``kwargs`` (``class_labels_kwargs`` / ``instance_labels_kwargs``) with the ``(y, x)`` pixel of
    the image where a region's map starts (its corner, which exports add back; (0, 0) too: a
    region at the image's corner is still a region) and the ``(y, x)`` vertices of the polygon
    drawn around it, in the map's own pixels (outside it the map is background, not a finding)."""
    if origin is not None:
        kwargs["metadata"][METADATA_KEY]["origin"] = [int(origin[0]), int(origin[1])]
    if polygon is not None:
        kwargs["metadata"][METADATA_KEY]["polygon"] = np.asarray(polygon, float).round(3).tolist()
    return kwargs


def recorded_origin(metadata: dict) -> tuple[int, int]:
    """The ``(y, x)`` a layer's map starts at in its image (``with_origin``); (0, 0) for a map
    of the whole image, as every layer not made from a region is."""
    y, x = (metadata or {}).get(METADATA_KEY, {}).get("origin", (0, 0))
    return int(y), int(x)


def region_origin(metadata: dict) -> tuple[int, int] | None:
    """The origin of a region's map (``with_origin``); ``None`` for a map of a whole image."""
    return recorded_origin(metadata) if "origin" in (metadata or {}).get(METADATA_KEY, {}) else None


def recorded_polygon(metadata: dict) -> np.ndarray | None:
    """The ``(y, x)`` vertices, in the map's own pixels, of the polygon a region's map was made
    inside (``with_origin``); ``None`` for a rectangle's or a whole image's map."""
    polygon = (metadata or {}).get(METADATA_KEY, {}).get("polygon")
    return None if polygon is None else np.asarray(polygon, float).reshape(-1, 2)


def region_in(result_layer, result_shape, whole_layer, whole_shape) -> tuple[slice, slice] | None:
    """Where a region's result (the Segment widget records its origin) lies in a layer of the whole
    image (its ground truth, the image itself): its rows and columns there, if it fits and both
    layers sit on the same place of the canvas; else ``None``. Shapes: (y, x)."""
    origin = region_origin(result_layer.metadata)
    if origin is None:
        return None
    (y, x), (h, w) = origin, result_shape
    if y + h > whole_shape[0] or x + w > whole_shape[1]:
        return None
    corner = np.asarray(result_layer.data_to_world((0, 0)), float)[-2:]
    if not np.allclose(corner, np.asarray(whole_layer.data_to_world((y, x)), float)[-2:], atol=1e-3):
        return None
    return slice(y, y + h), slice(x, x + w)


def pixel_size_um(layer) -> float | None:
    """The side of a pixel in µm where the layer says so: ``metadata['pixel_size_um']``, or a
    square ``scale`` in the layer's length ``units`` (nm, µm, mm: converted), or, in napari's
    default unit-less world, a square non-unit ``scale`` taken as µm; else ``None``."""
    size = getattr(layer, "metadata", {}).get("pixel_size_um")
    if size:
        return float(size)
    sy, sx = (float(s) for s in layer.scale[-2:])
    to_um = _micrometres_per_unit(getattr(layer, "units", None))
    if to_um is not None:  # a length: even a scale of 1 (1 µm, 1 mm) is a real pixel size
        return sy * to_um if np.isclose(sy, sx) else None
    return sy if sy == sx and sy != 1.0 else None


def _micrometres_per_unit(units) -> float | None:
    """µm per unit of a layer's x axis where its units are a length (napari's pint units); ``None``
    for napari's default 'pixel' and anything else: a 250 nm scale had been taken for 250 µm."""
    if not units:
        return None
    try:
        unit = units[-1]
        if str(unit.dimensionality) != "[length]":
            return None
        return float((1 * unit).to("micrometer").magnitude)
    except Exception:  # a napari without units, or a unit pint cannot convert
        return None


def legend_html(classes: list[str], colors: list | None = None, pickable: bool = False) -> str:
    """A one-paragraph legend, a coloured square and the name of each foreground class (rich text
    for a Qt label; it wraps with the dock). ``pickable``: each name is a link that
    ``pick_classes_from`` turns into "paint this class"."""
    colors = colors or class_colors(classes)
    items = []
    for index, (name, rgb) in enumerate(zip(classes[1:], colors[1:]), start=1):
        if rgb is None:
            continue
        hex_colour = "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))
        # a link in the class's own colour: Qt's default link blue is unreadable on napari's dark theme
        shown = (f'<a href="{CLASS_LINK}{index}" style="color:{hex_colour}">{escape(name)}</a>' if pickable
                 else escape(name))
        items.append(f'<span style="color:{hex_colour}; font-size:large">&#9632;</span>&nbsp;{shown}')
    return " &nbsp; ".join(items)


def pick_classes_from(legend, class_layer: Callable[[], object], viewer) -> None:
    """Clicking a class name in ``legend`` (a label showing a pickable ``legend_html``) makes that
    class the one painted in ``class_layer()``: napari's own label picker shows only numbers."""

    def pick(link: str) -> None:
        layer = class_layer()
        if layer is None or layer not in viewer.layers or not link.startswith(CLASS_LINK):
            return
        layer.selected_label = int(link[len(CLASS_LINK):])
        viewer.layers.selection.active = layer
        layer.mode = "paint"

    legend.native.linkActivated.connect(pick)


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
    # Qt's minimum for wrapped text is one word a line (a status of 30 words: ~500 px), which
    # made the dock that tall; one line is the minimum, the wrapped height what it asks for
    label.native.setMinimumHeight(label.native.fontMetrics().lineSpacing())
    return label


def shown_plane_words(viewer, layer, plane: tuple[int, ...]) -> str:
    """Which image of a stack ``plane`` is, in the terms of napari's sliders: 'slider at 2 of 0-2'
    (an unnamed axis, napari's default label a number such as -3) or the axis's own name."""
    labels = [str(label) for label in list(viewer.dims.axis_labels)[-layer.ndim:]]
    named = [label if not label.lstrip("-").isdigit() else "slider" for label in labels]
    return ", ".join(f"{named[i]} at {k} of 0-{layer.data.shape[i] - 1}" for i, k in enumerate(plane))


# a class map's own nuclei, by the names this plugin gives them (Segment, the reader, the samples)
# and a file pair's (<stem>_labels.tif beside <stem>_instances.tif: the README's naming)
NUCLEI_OF = ((" segmentation", " nuclei"), (" labels", " instances"), (" ground truth", " instances"),
             ("_labels", "_instances"))
ANNOTATION_ENDINGS = (" ground truth", " labels", "_labels")  # a ground-truth class map's name


def nuclei_twin_name(name: str) -> str | None:
    """The name of the nuclei layer made (or annotated) with the class map ``name``, if named as a pair."""
    for ending, nuclei in NUCLEI_OF:
        if name.endswith(ending):
            return name[: -len(ending)] + nuclei
    return None
