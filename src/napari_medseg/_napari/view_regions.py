"""Where on an image the user points: the field of view of the canvas, or a rectangle or polygon
drawn in a Shapes layer, as a region in the image layer's own level-0 pixels (its scale and
translate undone), and where a result over such a region goes back on the canvas."""

from __future__ import annotations

import numpy as np

from ..inference.regions import Region
from .common import WidgetInputError
from .layers import placement


def shapes_layers(viewer) -> list:
    from napari.layers import Shapes

    return [layer for layer in viewer.layers if isinstance(layer, Shapes)]


def field_of_view(viewer, layer) -> Region:
    """What the canvas shows, in ``layer``'s level-0 px (its scale and translate undone)."""
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 keeps the camera there
    camera = scene.camera if scene is not None else viewer.camera
    center = np.asarray(camera.center[-2:], float)
    half = np.asarray(viewer.canvas.size, float) / (2 * camera.zoom)
    corners = [center + half * (sy, sx) for sy in (-1, 1) for sx in (-1, 1)]
    return pixel_box(to_pixels(layer, corners))


def drawn_shape(shapes, layer) -> tuple[Region, np.ndarray | None]:
    """The selected (else the last) rectangle or polygon of a Shapes layer in ``layer``'s level-0
    px: its bounding box, and its vertices ``(y, x)`` unless it is an upright rectangle."""
    if shapes is None or not len(shapes.data):
        raise WidgetInputError("Draw a rectangle or polygon in a Shapes layer, and choose that layer under "
                               "'shapes', to segment it.")
    index = max(shapes.selected_data) if shapes.selected_data else len(shapes.data) - 1
    kind = shapes.shape_type[index]
    if kind not in ("rectangle", "polygon"):
        raise WidgetInputError(f"The chosen shape of '{shapes.name}' is a {kind}; select a rectangle or polygon.")
    vertices = to_pixels(layer, [shapes.data_to_world(v) for v in shapes.data[index]])
    upright = kind == "rectangle" and all(len(np.unique(np.round(vertices[:, i], 6))) == 2 for i in (0, 1))
    return pixel_box(vertices), None if upright else vertices


def to_pixels(layer, world_points) -> np.ndarray:
    """World points as ``(y, x)`` level-0 px of ``layer``."""
    return np.array([np.asarray(layer.world_to_data(point), float)[-2:] for point in world_points])


# world -> pixel conversions leave float noise: napari keeps shapes in float32, so a corner drawn
# at pixel 600 of a 0.499 µm/px slide comes back as 599.99998777 (and about 0.01 px at the far
# end of a 100,000 px slide): a box edge is read to this many decimals
EDGE_DECIMALS = 2


def pixel_box(points: np.ndarray) -> Region:
    """The pixels whose centres lie in the points' bounding box, its far edges left out (a pixel's
    centre is at its index): a box drawn from 0 to 256, or along pixel edges from -0.5 to 255.5,
    holds 256 pixels a side, never 257 by a rounding that differs from side to side."""
    box = np.round(np.asarray(points, float), EDGE_DECIMALS)
    (y0, x0), (y1, x1) = np.ceil(box.min(0)).astype(int), np.ceil(box.max(0)).astype(int)
    return Region(int(x0), int(y0), int(x1 - x0), int(y1 - y0))


def inside(polygon: np.ndarray, region: Region) -> np.ndarray:
    """The pixels of ``region`` inside ``polygon`` (both in level-0 px)."""
    from skimage.draw import polygon2mask

    return polygon2mask((region.height, region.width), polygon - (region.y, region.x))


def region_placement(layer, region: Region | None) -> dict:
    """Where a result over ``region`` of ``layer`` goes: the layer's placement, shifted to the region."""
    where = placement(layer)
    if region is None:
        return where
    offset = (region.y, region.x)
    return {**where, "translate": tuple(t + s * o for t, s, o in zip(where["translate"], where["scale"], offset))}
