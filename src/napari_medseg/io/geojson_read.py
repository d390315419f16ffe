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
from ..wording import counted

UNCLASSIFIED_NAME = "nucleus"  # the class of an object without a classification
# µm²: larger outlines are regions (the annotation drawn around the nuclei), not nuclei, which
# measure ~20-300 µm²; 0.25 µm/px assumed where the image records no pixel size
MAX_NUCLEUS_AREA_UM2 = 1000.0
ASSUMED_PIXEL_SIZE_UM = 0.25


class GeoJSONReadError(MedsegError, ValueError):
    """The file holds no outlines this can read."""


@dataclass
class Outline:
    """One object: its polygons (each an outer ring and its holes, ``[[x, y], ...]``) and class."""

    polygons: list[list[np.ndarray]]  # per polygon its outer ring, then its holes: (N, 2) x, y
    class_name: str = UNCLASSIFIED_NAME
    color: list[int] | None = None


@dataclass
class Outlines:
    objects: list[Outline]
    skipped: dict[str, int] = field(default_factory=dict)  # geometry type -> objects that are not areas
    empty: bool = False  # the file holds no object at all (a field without nuclei)

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
    outlines = Outlines([], empty=not features)
    for number, feature in enumerate(features, 1):
        if not isinstance(feature, dict):
            continue
        # a QuPath cell's nucleus outline is its nucleusGeometry; its geometry is the whole cell
        geometry = feature.get("nucleusGeometry") or feature.get("geometry") or {}
        kind = geometry.get("type", "none") if isinstance(geometry, dict) else "none"
        if kind not in ("Polygon", "MultiPolygon"):
            outlines.skipped[kind] = outlines.skipped.get(kind, 0) + 1
            continue
        polygons = _polygons(geometry, kind, f"'{path.name}', object {number}")
        if not polygons:  # rings of fewer than 3 points: no area
            outlines.skipped["outline of no area"] = outlines.skipped.get("outline of no area", 0) + 1
            continue
        name, color = _classification(feature.get("properties") or {})
        outlines.objects.append(Outline(polygons, name, color))
    if not outlines.objects and not outlines.empty:
        found = ", ".join(f"{n} {kind}" for kind, n in outlines.skipped.items())
        raise GeoJSONReadError(f"'{path.name}' holds no outlines (Polygon or MultiPolygon objects); it holds {found}.")
    return outlines


def _polygons(geometry: dict, kind: str, where: str) -> list[list[np.ndarray]]:
    """A Polygon's or MultiPolygon's rings as ``(N, 2)`` float arrays of x, y (a z is dropped), the
    rings of fewer than 3 distinct points left out; a position that is not numbers is refused, named."""
    try:
        polygons = [geometry["coordinates"]] if kind == "Polygon" else list(geometry["coordinates"])
        parsed = []
        for rings in polygons:
            arrays = [np.array([[float(position[0]), float(position[1])] for position in ring], float).reshape(-1, 2)
                      for ring in rings]
            if arrays and _has_area(arrays[0]):
                parsed.append([ring for ring in arrays if _has_area(ring)])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise GeoJSONReadError(f"{where}: its coordinates are not [x, y] numbers ({exc}).") from exc
    if any(not np.isfinite(ring).all() for rings in parsed for ring in rings):
        raise GeoJSONReadError(f"{where}: its coordinates hold NaN or infinity.")
    return parsed


def _has_area(ring: np.ndarray) -> bool:
    """At least three distinct points (a ring closed on two points is a line)."""
    return len(np.unique(ring, axis=0)) >= 3


def _classification(properties: dict) -> tuple[str, list[int] | None]:
    """QuPath's ``classification``: ``{"name", "color"}``; since QuPath 0.4 a derived class as
    ``{"names": ["Tumor", "Positive"], ...}`` (named "Tumor: Positive", as QuPath shows it); a bare
    name in some exports."""
    value = properties.get("classification")
    if isinstance(value, dict):
        names = value.get("names")
        name = ": ".join(str(n) for n in names) if isinstance(names, list) and names else value.get("name")
        if name:
            color = value.get("color")
            return str(name), [int(c) for c in color[:3]] if isinstance(color, list) and len(color) >= 3 else None
    if isinstance(value, str) and value:
        return value, None
    return UNCLASSIFIED_NAME, None


OUTSIDE, TOO_LARGE = "outside", "too large"  # the outlines ``rasterise`` leaves unpainted, by why


def rasterise(outlines: Outlines, shape: tuple[int, int], classes: list[str],
              origin: tuple[float, float] = (0.0, 0.0),
              max_area_px: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(instances, class map, left out)``: each object painted with its own id (1, 2, ... in the
    file's order) and its class's index in ``classes``, on a ``shape`` grid whose first pixel's
    corner lies at ``origin`` (x, y) in the file's coordinates. Left out, and counted: objects
    wholly outside the grid (``OUTSIDE``) and those covering more than ``max_area_px`` pixels
    (``TOO_LARGE``: a region annotation drawn around the nuclei is no nucleus)."""
    from skimage.draw import polygon as filled

    height, width = shape
    instances = np.zeros(shape, np.int32)
    class_map = np.zeros(shape, np.uint8 if len(classes) <= 256 else np.uint16)
    index = {name: i for i, name in enumerate(classes)}
    left_out, next_id = {OUTSIDE: 0, TOO_LARGE: 0}, 1
    for obj in outlines.objects:
        # each ring in pixel-centre coordinates (scikit-image's), from QuPath's pixel corners
        polygons = [[ring - (origin[0] + 0.5, origin[1] + 0.5) for ring in rings] for rings in obj.polygons]
        points = np.concatenate([ring for rings in polygons for ring in rings])
        top = int(np.clip(np.floor(points[:, 1].min()), 0, height))
        left = int(np.clip(np.floor(points[:, 0].min()), 0, width))
        bottom = int(np.clip(np.ceil(points[:, 1].max()) + 1, 0, height))
        right = int(np.clip(np.ceil(points[:, 0].max()) + 1, 0, width))
        inside = np.zeros((max(bottom - top, 0), max(right - left, 0)), bool)  # the object's box alone
        for rings in polygons:
            for hole, ring in enumerate(rings):
                rows, cols = filled(ring[:, 1] - top, ring[:, 0] - left, inside.shape)
                inside[rows, cols] = hole == 0  # a polygon's later rings are its holes
        area = int(inside.sum())
        if not area:
            left_out[OUTSIDE] += 1
        elif max_area_px is not None and area > max_area_px:
            left_out[TOO_LARGE] += 1
        else:
            box = (slice(top, bottom), slice(left, right))
            instances[box][inside] = next_id
            class_map[box][inside] = index[obj.class_name]
            next_id += 1
    return instances, class_map, left_out


@dataclass
class ConvertedOutlines:
    stem: str
    objects: int  # painted on the image
    left_out: dict[str, int]  # OUTSIDE it, TOO_LARGE for a nucleus: not painted
    skipped: dict[str, int]
    classes: list[str]
    counts: dict[str, int]  # objects per class


def geojson_to_dataset(outlines_path: str | os.PathLike, image_path: str | os.PathLike, out_dir: str | os.PathLike,
                       classes: list[str] | None = None, origin: tuple[float, float] = (0.0, 0.0),
                       overwrite: bool = False) -> ConvertedOutlines:
    """Adds the image and its outlines to the dataset folder ``out_dir`` (made if new):
    ``images/<stem>`` (a copy), ``labels/<stem>.tif`` (classes), ``instances/<stem>.tif`` (one id
    per object) and ``classes.json``. The classes are the folder's own where it has them, else
    ``classes`` (background first), else background and the names the file uses, sorted. Nothing in the
    folder is replaced, but with ``overwrite`` this image's own three files (outlines corrected
    again in QuPath)."""
    import shutil

    from ..colors import class_colors
    from .dataset import CLASSES_FILE, read_classes, write_classes
    from .images import file_stem, label_record, read_image, write_label_map
    from .outputs import temp_path
    from .pixel_size import file_pixel_size_um
    from .slides import SLIDE_SUFFIXES

    image_path, out = Path(image_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GeoJSONReadError(f"{out} is a file: give the dataset folder to write (new, or one to add the image to).")
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
    twice = sorted({name for name in classes if classes.count(name) > 1})
    if twice:  # two ids of one name: one of them would never be painted, nor scored
        raise GeoJSONReadError(f"the classes name {', '.join(repr(n) for n in twice)} twice: {', '.join(classes)}.")
    _check_classes_hold(outlines, classes, "the folder's classes" if (out / CLASSES_FILE).is_file()
                        else "the classes given")
    stem = file_stem(image_path)
    own = {out / "images" / image_path.name, out / "labels" / f"{stem}.tif", out / "instances" / f"{stem}.tif"}
    taken = [p for sub in ("images", "labels", "instances") for p in sorted((out / sub).glob(f"{stem}.*"))]
    others = [p for p in taken if p not in own]  # another file of the stem (x.tif beside x.png): never replaced
    if others or (taken and not overwrite):
        raise GeoJSONReadError(f"{out} already holds '{stem}' ({(others or taken)[0]}): nothing is replaced; "
                               + ("pass --overwrite to replace its image, labels and instances with these, "
                                  if not others else "")
                               + "convert into another folder, or rename the image.")
    size = file_pixel_size_um(image_path)
    max_area_px = MAX_NUCLEUS_AREA_UM2 / (size or ASSUMED_PIXEL_SIZE_UM) ** 2
    instances, class_map, left_out = rasterise(outlines, image.shape[:2], classes, origin, max_area_px)
    painted = int(instances.max(initial=0))
    if not painted and not outlines.empty:
        height, width = image.shape[:2]
        if left_out[TOO_LARGE]:
            raise GeoJSONReadError(f"the {counted(left_out[TOO_LARGE], 'outline')} on '{image_path.name}' cover more "
                                   f"than {MAX_NUCLEUS_AREA_UM2:g} µm² each: regions, not nuclei (export the nuclei "
                                   "from QuPath, not the annotation around them).")
        count = len(outlines.objects)
        what = "the one outline does not lie" if count == 1 else f"none of the {count} outlines lies"
        raise GeoJSONReadError(f"{what} on '{image_path.name}' ({width} x {height} px): is it the image they were "
                               "drawn on? Outlines of a region of a slide need the region's top-left corner as "
                               "--origin X,Y.")
    given = outlines.colors()
    colors = [list(given.get(name) or default) for name, default in zip(classes, class_colors(classes))]
    votes = np.zeros(painted + 1, np.int64)
    votes[instances[instances > 0]] = class_map[instances > 0]  # each object is painted with one class
    (out / "images").mkdir(parents=True, exist_ok=True)
    copy = temp_path(out / "images" / image_path.name)
    try:  # the image, labels and nuclei land whole or not at all (each file by a rename)
        shutil.copyfile(image_path, copy)
        write_label_map(out / "labels" / f"{stem}.tif", class_map, size, label_record("classes", classes, colors))
        write_label_map(out / "instances" / f"{stem}.tif", instances, size,
                        label_record("instances", classes, colors, instance_classes=votes))
        os.replace(copy, out / "images" / image_path.name)
    except BaseException:
        copy.unlink(missing_ok=True)
        if not taken:  # a new entry goes again; a replaced one keeps what was written
            for sub in ("labels", "instances"):
                (out / sub / f"{stem}.tif").unlink(missing_ok=True)
        raise
    if not (out / CLASSES_FILE).is_file():
        write_classes(out, classes, source=f"medseg convert geojson {Path(outlines_path).name}")
    counts = {name: int((votes[1:] == i).sum()) for i, name in enumerate(classes) if i and (votes[1:] == i).any()}
    return ConvertedOutlines(stem, painted, left_out, dict(outlines.skipped), classes, counts)


def _check_classes_hold(outlines: Outlines, classes: list[str], whose: str) -> None:
    """Refuses outlines of a class ``classes`` lacks, or of background (id 0 is no nucleus)."""
    named = outlines.class_names()
    if "background" in named:
        raise GeoJSONReadError("some outlines are classed 'background', which is id 0, no nucleus: give them a "
                               "nucleus class in QuPath, or delete them.")
    unknown = [name for name in named if name not in classes[1:]]
    if not unknown:
        return
    unclassified = sum(o.class_name == UNCLASSIFIED_NAME for o in outlines.objects)
    if UNCLASSIFIED_NAME in unknown and unclassified:
        raise GeoJSONReadError(f"{counted(unclassified, 'outline')} {'has' if unclassified == 1 else 'have'} no "
                               f"classification (read as '{UNCLASSIFIED_NAME}'), which {whose} "
                               f"({', '.join(classes[1:])}) do not hold: classify them in QuPath, or convert "
                               "without --classes.")
    raise GeoJSONReadError(f"the outlines name {', '.join(repr(n) for n in unknown)}, which {whose} "
                           f"({', '.join(classes[1:])}) do not hold.")
