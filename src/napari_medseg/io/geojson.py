"""Instances as GeoJSON that QuPath imports (File > Import objects): one polygon per nucleus (a
multipolygon for an id in several parts), with its class name and colour.

Coordinates follow QuPath: (0, 0) is the top-left *corner* of the first pixel, so pixel (row r,
column c) covers x in [c, c + 1], y in [r, r + 1]. napari and scikit-image put pixel centres on
whole numbers instead; outlines traced there are moved by half a pixel on the way out."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from .images import atomic_write


def instance_polygons(instances: np.ndarray, origin: tuple[float, float] = (0, 0)) -> dict[int, list[list[list[float]]]]:
    """The outlines of each instance, one closed ring ``[[x, y], ...]`` per separate part (a
    nucleus is one part; an id painted twice, or touching itself only at a corner, is several), in
    QuPath's pixel-corner coordinates: the line between its pixels and the others, corners cut
    (marching squares). ``origin``: ``(y, x)`` of the map's first pixel in the image it covers."""
    from scipy import ndimage as ndi

    polygons: dict[int, list[list[list[float]]]] = {}
    for index, bbox in enumerate(ndi.find_objects(instances), start=1):
        if bbox is None:
            continue
        y0, x0 = bbox[0].start, bbox[1].start
        inside = instances[bbox] == index
        shift = (x0 - 0.5 + origin[1], y0 - 0.5 + origin[0])
        rings = _outer_rings(inside, shift)
        if rings:
            polygons[index] = rings
    return polygons


def _outer_rings(inside: np.ndarray, shift: tuple[float, float]) -> list[list[list[float]]]:
    """The outer ring of each 4-connected part of ``inside`` (holes are not exported), shifted by
    ``shift`` (x, y) after the half pixel from centre to corner coordinates."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    mask = np.zeros((inside.shape[0] + 2, inside.shape[1] + 2), np.uint8)  # a margin: closed outlines
    mask[1:-1, 1:-1] = inside
    contours = find_contours(mask, 0.5)
    if len(contours) > 1:  # parts, or holes: one outer ring per part (marching squares' 'low' = 4-connected)
        parts, count = ndi.label(mask)
        contours = [max(find_contours((parts == part).astype(np.uint8), 0.5), key=len) for part in range(1, count + 1)]
    rings = []
    for outline in contours:
        # (x, y): the margin's 1 px off, then half a pixel from centre to corner coordinates
        coords = (outline[:, ::-1] + shift).tolist()
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        if len(coords) >= 4:
            rings.append(coords)
    return rings


def geometry(rings: list[list[list[float]]]) -> dict:
    """A GeoJSON Polygon for one ring, a MultiPolygon for several."""
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": [rings[0]]}
    return {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]}


def map_geometry(geometry: dict, to) -> dict:
    """``geometry`` (Polygon or MultiPolygon) with each point ``[x, y]`` replaced by ``to(x, y)``."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    mapped = [[[list(to(x, y)) for x, y in ring] for ring in polygon] for polygon in polygons]
    return {"type": geometry["type"], "coordinates": mapped[0] if geometry["type"] == "Polygon" else mapped}


def instances_to_geojson(instances: np.ndarray, classes: np.ndarray | None = None,
                         class_names: list[str] | None = None, colors: list | None = None,
                         origin: tuple[float, float] = (0, 0), run: uuid.UUID | None = None) -> dict:
    """A FeatureCollection; ``classes[id]`` (an array or a dict) is the class index of instance ``id``;
    ``origin`` (``y, x`` px) places a region's map in its image. Feature ids are unique to the
    ``run`` (a fresh one by default): two exports of one slide imported into one QuPath image
    must not share ids (QuPath takes a repeated id for the same object)."""
    run = run or uuid.uuid4()
    from skimage.segmentation import relabel_sequential

    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(f"GeoJSON export needs a 2-D integer instance map, got {instances.dtype} {instances.shape}.")
    relabelled, _, inverse = relabel_sequential(instances)
    # one table, not an ArrayMap lookup per nucleus (each maps all ids: 14730 nuclei had taken 30 s)
    own_ids = dict(zip(inverse.in_values.tolist(), inverse.out_values.tolist()))
    features = []
    for new_id, rings in instance_polygons(relabelled, origin).items():
        old_id = int(own_ids[new_id])  # the layer's own id: its label, and the key of its class
        properties: dict = {"objectType": "detection", "label": old_id}
        c = int(classes[old_id]) if classes is not None and class_names is not None else 0
        if c > 0:  # class 0 (background): a nucleus without a class, left unclassified
            properties["classification"] = {"name": class_names[c]}
            if colors is not None:
                properties["classification"]["color"] = [int(v) for v in colors[c][:3]]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(run, str(old_id))),
            "geometry": geometry(rings),
            "properties": properties,
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, instances: np.ndarray, classes: np.ndarray | None = None,
                  class_names: list[str] | None = None, colors: list | None = None,
                  origin: tuple[float, float] = (0, 0)) -> Path:
    data = instances_to_geojson(instances, classes, class_names, colors, origin)
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)))
    return path
