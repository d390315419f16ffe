"""QuPath GeoJSON outlines (File > Export objects) read back as label maps: an instance map (one id
per object, in the file's order: a later object paints over an earlier one) and a class map from
each object's classification, on the grid of the image the outlines were drawn on.

Pathologists annotate nuclei in QuPath; with this their outlines become ground truth that
``medseg evaluate``, the Metrics widget and training read (``medseg convert geojson``). The
coordinates are QuPath's (``io.geojson``): (0, 0) is the first pixel's top-left corner, so a
pixel is inside an outline when its centre, at (x + 0.5, y + 0.5), is. Outlines this package
writes come back as the maps they were traced from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedsegError

UNCLASSIFIED_NAME = "nucleus"  # the class of an object without a classification


class GeoJSONReadError(MedsegError, ValueError):
    """The file holds no outlines this can read."""


@dataclass
class Outline:
    """One object: its polygons (each an outer ring and its holes, ``[[x, y], ...]``) and class."""

    polygons: list[list[list[list[float]]]]
    class_name: str = UNCLASSIFIED_NAME
    color: list[int] | None = None


@dataclass
class Outlines:
    objects: list[Outline]
    skipped: dict[str, int] = field(default_factory=dict)  # geometry type -> objects that are not areas

    def class_names(self) -> list[str]:
        """The classes named, in the order they first appear."""
        return list(dict.fromkeys(o.class_name for o in self.objects))

    def colors(self) -> dict[str, list[int]]:
        return {o.class_name: o.color for o in self.objects if o.color is not None}


def read_outlines(path: str | os.PathLike) -> Outlines:
    """The area objects (Polygon, MultiPolygon) of a GeoJSON file: a FeatureCollection, a list of
    features (QuPath's older export) or one feature. A QuPath cell is read as its nucleus."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GeoJSONReadError(f"'{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GeoJSONReadError(f"'{path.name}' is not a GeoJSON file ({exc}).") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        raise GeoJSONReadError(f"'{path.name}' holds no GeoJSON features (a FeatureCollection, or a list of "
                               "features, as QuPath's File > Export objects writes).")
    outlines = Outlines([])
    for feature in features:
        if not isinstance(feature, dict):
            continue
        # a QuPath cell's nucleus outline is its nucleusGeometry; its geometry is the whole cell
        geometry = feature.get("nucleusGeometry") or feature.get("geometry") or {}
        kind = geometry.get("type", "none") if isinstance(geometry, dict) else "none"
        if kind not in ("Polygon", "MultiPolygon"):
            outlines.skipped[kind] = outlines.skipped.get(kind, 0) + 1
            continue
        polygons = [geometry["coordinates"]] if kind == "Polygon" else geometry["coordinates"]
        name, color = _classification(feature.get("properties") or {})
        outlines.objects.append(Outline(polygons, name, color))
    if not outlines.objects:
        found = ", ".join(f"{n} {kind}" for kind, n in outlines.skipped.items()) or "no features"
        raise GeoJSONReadError(f"'{path.name}' holds no outlines (Polygon or MultiPolygon objects); it holds {found}.")
    return outlines


def _classification(properties: dict) -> tuple[str, list[int] | None]:
    """QuPath's ``classification`` (``{"name", "color"}``, or a bare name in some exports)."""
    value = properties.get("classification")
    if isinstance(value, dict) and value.get("name"):
        color = value.get("color")
        return str(value["name"]), [int(c) for c in color[:3]] if isinstance(color, list) and len(color) >= 3 else None
    if isinstance(value, str) and value:
        return value, None
    return UNCLASSIFIED_NAME, None


def rasterise(outlines: Outlines, shape: tuple[int, int], classes: list[str],
              origin: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, int]:
    """``(instances, class map, objects outside)``: each object painted with its own id (1, 2, ...
    in the file's order) and its class's index in ``classes``, on a ``shape`` grid whose first
    pixel's corner lies at ``origin`` (x, y) in the file's coordinates. Objects wholly outside the
    grid are counted, not painted."""
    from skimage.draw import polygon as filled

    height, width = shape
    instances = np.zeros(shape, np.int32)
    class_map = np.zeros(shape, np.uint8 if len(classes) <= 256 else np.uint16)
    index = {name: i for i, name in enumerate(classes)}
    outside, next_id = 0, 1
    for obj in outlines.objects:
        # each ring in pixel-centre coordinates (scikit-image's), from QuPath's pixel corners
        polygons = [[np.asarray(ring, float).reshape(-1, 2) - (origin[0] + 0.5, origin[1] + 0.5) for ring in rings]
                    for rings in obj.polygons]
        points = np.concatenate([ring for rings in polygons for ring in rings])
        top, left = max(int(np.floor(points[:, 1].min())), 0), max(int(np.floor(points[:, 0].min())), 0)
        bottom = min(int(np.ceil(points[:, 1].max())) + 1, height)
        right = min(int(np.ceil(points[:, 0].max())) + 1, width)
        if bottom <= top or right <= left:
            outside += 1
            continue
        inside = np.zeros((bottom - top, right - left), bool)  # the object's box alone
        for rings in polygons:
            for hole, ring in enumerate(rings):
                if len(ring) >= 3:
                    rows, cols = filled(ring[:, 1] - top, ring[:, 0] - left, inside.shape)
                    inside[rows, cols] = hole == 0  # a polygon's later rings are its holes
        if not inside.any():
            outside += 1
            continue
        box = (slice(top, bottom), slice(left, right))
        instances[box][inside] = next_id
        class_map[box][inside] = index[obj.class_name]
        next_id += 1
    return instances, class_map, outside


@dataclass
class ConvertedOutlines:
    stem: str
    objects: int  # painted on the image
    outside: int  # wholly outside it
    skipped: dict[str, int]
    classes: list[str]
    counts: dict[str, int]  # objects per class


def geojson_to_dataset(outlines_path: str | os.PathLike, image_path: str | os.PathLike, out_dir: str | os.PathLike,
                       classes: list[str] | None = None, origin: tuple[float, float] = (0.0, 0.0)) -> ConvertedOutlines:
    """Adds the image and its outlines to the dataset folder ``out_dir`` (made if new):
    ``images/<stem>`` (a copy), ``labels/<stem>.tif`` (classes), ``instances/<stem>.tif`` (one id
    per object) and ``classes.json``. The classes are the folder's own where it has them, else
    ``classes`` (background first), else background and the names the file uses, sorted. Nothing in the
    folder is replaced."""
    import shutil

    from ..colors import class_colors
    from .dataset import CLASSES_FILE, read_classes, write_classes
    from .images import file_stem, label_record, read_image, write_label_map
    from .outputs import temp_path
    from .pixel_size import file_pixel_size_um
    from .slides import SLIDE_SUFFIXES

    image_path, out = Path(image_path), Path(out_dir)
    if image_path.suffix.lower() in SLIDE_SUFFIXES:
        raise GeoJSONReadError(f"'{image_path.name}' is a whole slide: export the annotated region as an image "
                               "(with its top-left corner as --origin X,Y) and convert that.")
    outlines = read_outlines(outlines_path)
    image = read_image(image_path)  # says what is wrong with a file it cannot read
    named = outlines.class_names()
    if (out / CLASSES_FILE).is_file():
        classes, _ = read_classes(out)
    elif classes:
        classes = list(classes) if classes[0] == "background" else ["background", *classes]
    else:
        classes = ["background", *sorted(named)]
    unknown = [name for name in named if name not in classes[1:]]
    if unknown:
        whose = "the folder's classes" if (out / CLASSES_FILE).is_file() else "the classes given"
        raise GeoJSONReadError(f"the outlines name {', '.join(repr(n) for n in unknown)}, which {whose} "
                               f"({', '.join(classes[1:])}) do not hold.")
    stem = file_stem(image_path)
    taken = [p for sub in ("images", "labels", "instances") for p in sorted((out / sub).glob(f"{stem}.*"))]
    if taken:
        raise GeoJSONReadError(f"{out} already holds '{stem}' ({taken[0]}): nothing is replaced; convert into "
                               "another folder, or rename the image.")
    instances, class_map, outside = rasterise(outlines, image.shape[:2], classes, origin)
    painted = int(instances.max(initial=0))
    if not painted:
        height, width = image.shape[:2]
        raise GeoJSONReadError(f"none of the {len(outlines.objects)} outlines lies on '{image_path.name}' "
                               f"({width} x {height} px): is it the image they were drawn on? Outlines of a "
                               "region of a slide need the region's top-left corner as --origin X,Y.")
    given = outlines.colors()
    colors = [list(given.get(name) or default) for name, default in zip(classes, class_colors(classes))]
    votes = np.zeros(painted + 1, np.int64)
    votes[instances[instances > 0]] = class_map[instances > 0]  # each object is painted with one class
    size = file_pixel_size_um(image_path)
    (out / "images").mkdir(parents=True, exist_ok=True)
    copy = temp_path(out / "images" / image_path.name)
    try:  # the image, labels and nuclei land whole or not at all
        shutil.copyfile(image_path, copy)
        write_label_map(out / "labels" / f"{stem}.tif", class_map, size, label_record("classes", classes, colors))
        write_label_map(out / "instances" / f"{stem}.tif", instances, size,
                        label_record("instances", classes, colors, instance_classes=votes))
        os.replace(copy, out / "images" / image_path.name)
    except BaseException:
        copy.unlink(missing_ok=True)
        for sub in ("labels", "instances"):
            (out / sub / f"{stem}.tif").unlink(missing_ok=True)
        raise
    if not (out / CLASSES_FILE).is_file():
        write_classes(out, classes, source=f"medseg convert geojson {Path(outlines_path).name}")
    counts = {name: int((votes[1:] == i).sum()) for i, name in enumerate(classes) if i and (votes[1:] == i).any()}
    return ConvertedOutlines(stem, painted, outside, dict(outlines.skipped), classes, counts)
