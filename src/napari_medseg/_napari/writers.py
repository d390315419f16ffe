"""Writer contributions: Labels layers as QuPath GeoJSON outlines or as label TIFFs.

napari reports a writer's ``ValueError`` as "not a valid writer" and drops its message, so a
refusal leaves here as an ``OutputWriteError`` (an ``OSError``): napari shows its message as it
is. Both formats are written to a temp file and renamed: a refused or failed save leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from ..io.geojson import write_geojson
from ..io.images import RECORDED_VOTES_MAX, write_label_map
from ..io.outputs import OutputWriteError, write_error
from ..nuclei.votes import instance_classes
from .common import CLASS_ID_LIMIT, WidgetInputError, class_map_top
from .layers import METADATA_KEY, nuclei_twin_name, recorded_origin


GEOJSON_SUFFIXES = (".geojson",)  # as napari.yaml's filename_extensions, the first added where none is given
TIFF_SUFFIXES = (".tif", ".tiff")


def with_suffix(path: str, suffixes: tuple[str, ...]) -> str:
    """``path``, or ``path`` + the format's suffix where it ends in none of ``suffixes``: napari's
    save dialog offers the layer's name bare, and a file saved as ``CoNSeP ground truth`` was
    opened by no reader (napari's own writers add theirs too)."""
    return path if str(path).lower().endswith(suffixes) else f"{path}{suffixes[0]}"


def write_labels_geojson(path: str, data, meta: dict) -> list[str]:
    path = with_suffix(path, GEOJSON_SUFFIXES)
    with _save_errors_shown(path, meta):
        info = meta.get("metadata", {}).get(METADATA_KEY, {})
        _not_a_pyramid(data, info)
        labels = _plane(data)
        origin = recorded_origin(meta.get("metadata"))  # a region's result: outlines in the image's pixels
        # more names than a class map has: numbered names given to an instance map's every id
        classes = info.get("classes") if len(info.get("classes") or ()) <= CLASS_ID_LIMIT else None
        if info.get("kind") == "instances" or (not classes and int(labels.max(initial=0)) >= CLASS_ID_LIMIT):
            _write_instances(path, labels, info, origin)  # ids no class map has: nuclei, as they are
        else:  # a class map: its regions, as painted (a watershed had cut a painted block into strips)
            class_map_top(_name(meta), labels, classes)
            regions = class_regions(labels)
            write_geojson(path, regions, instance_classes(regions, labels), classes, info.get("colors"), origin)
            _say_regions_are_not_nuclei(_name(meta), int(regions.max(initial=0)))
    return [path]


def _say_regions_are_not_nuclei(name: str, regions: int) -> None:
    """A QuPath user who saved the class map had 439 outlines for 112 nuclei (touching nuclei are one
    region, a nucleus of two classes two): said where they look, the nuclei layer named."""
    from napari.utils.notifications import show_info

    twin = nuclei_twin_name(name)
    show_info(f"Saved {regions} outlines of '{name}': one per connected region of one class, not one per "
              f"nucleus. For one outline per nucleus, save its nuclei layer{f' ({twin!r})' if twin else ''}.")


def class_regions(class_map: np.ndarray) -> np.ndarray:
    """One id per 4-connected region of one class: what a class map holds. Splitting touching nuclei
    is the nuclei layer's work (Segment's, from the model's distance map); a watershed of the map
    alone invents cuts (a painted 30 x 60 block became 6 strips) and counts (65 for Segment's 60)."""
    from skimage.measure import label

    return label(class_map, background=0, connectivity=1)


def write_labels_tiff(path: str, data, meta: dict) -> list[str]:
    path = with_suffix(path, TIFF_SUFFIXES)
    with _save_errors_shown(path, meta):
        _not_a_pyramid(data, meta.get("metadata", {}).get(METADATA_KEY, {}))
        write_label_map(path, _plane(data), _pixel_size_um(meta), _label_record(meta))
    return [path]


# what a saved label TIFF keeps of its layer, so that it reopens as what it was (the plugin's reader)
RECORDED_FIELDS = ("kind", "classes", "colors", "origin", "polygon", "instance_classes")
PLAIN_LABELS_KIND = "labels"  # a Labels layer this plugin did not make


def _label_record(meta: dict) -> dict:
    """The plugin's metadata of the layer (kind, class names and colours, a region's origin and polygon, the
    nuclei's classes), JSON-ready; for a layer the plugin did not make (painted by hand) the kind
    ``labels``: the file is a Labels layer's, which the reader reopens as one (a map of many ids
    would otherwise be taken for an image)."""
    info = meta.get("metadata", {}).get(METADATA_KEY, {})
    record = {"kind": PLAIN_LABELS_KIND}
    for key in RECORDED_FIELDS:
        value = info.get(key)
        if value is None:
            continue
        value = json.loads(json.dumps(value, default=lambda v: v.tolist()))  # numpy arrays and numbers too
        if key == "instance_classes" and len(value) > RECORDED_VOTES_MAX:
            continue
        record[key] = value
    return record


def _pixel_size_um(meta: dict) -> float | None:
    """µm per pixel of a layer placed in micrometres with square pixels (one opened from a file
    that records its pixel size), else ``None``."""
    scale, units = meta.get("scale"), meta.get("units")
    if scale is None or units is None or len(scale) < 2 or len(units) < 2:
        return None
    if any(str(u) not in ("micrometer", "µm", "um") for u in units[-2:]) or scale[-1] != scale[-2]:
        return None
    return float(scale[-1])


def _write_instances(path: str, labels: np.ndarray, info: dict, origin: tuple[int, int]) -> None:
    table = info.get("instance_classes")
    if info.get("kind") != "instances" or table is None or not info.get("classes"):
        write_geojson(path, labels, origin=origin)
        return
    # the classes the nuclei had when made; ids added since are left unclassified (0)
    votes = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    n = min(len(votes), len(table))
    votes[:n] = np.asarray(table)[:n]
    write_geojson(path, labels, votes, info["classes"], info.get("colors"), origin)


def _not_a_pyramid(data, info: dict) -> None:
    """A multiscale layer (a slide run's labels, read lazily from disk) is not read whole into
    memory to be saved: its exports were written with it."""
    if isinstance(data, Sequence) and not isinstance(data, np.ndarray):
        where = f" in {info['results']}" if info.get("results") else " in the folder its run wrote to"
        raise WidgetInputError(f"it is a whole-slide label pyramid ({len(data)} levels), too large to save from the "
                               "viewer; its GeoJSON, per-nucleus CSV and OME-TIFF pyramids were written with it"
                               f"{where}.")


def _plane(data) -> np.ndarray:
    shape = tuple(getattr(data, "shape", np.shape(data)))
    # Segment's result on one image of a stack (a PanNuke fold) is a stack of one plane
    while len(shape) > 2 and shape[0] == 1:
        data, shape = data[0], shape[1:]
    if len(shape) != 2:  # said before a lazy stack (a PanNuke fold's thousands of maps) is computed whole
        raise WidgetInputError(f"it is a stack of {int(np.prod(shape[:-2]))} maps {shape}; one file holds one "
                               "image's map: save a Segment result of that image (one plane), or use "
                               "`medseg convert pannuke` for a fold's ground truth.")
    labels = np.asarray(data)
    if labels.min(initial=0) < 0:
        raise WidgetInputError(f"it holds the negative id {int(labels.min())}; label ids are 0 (background) and up: "
                               "paint those pixels with 0 or a class first.")
    return labels


def _name(meta: dict) -> str:
    return meta.get("name") or "the layer"


def _not_an_open_file(target: Path, saving: str) -> None:
    """Refuses to write over a file another layer of an open viewer was read from: the image a
    result was made from had been replaced by its nuclei (only Qt's 'replace?' stood in the way),
    and a lazily read slide would then read the new file. A layer saved back to its own file (a
    label TIFF corrected by hand) is written."""
    from napari.viewer import Viewer

    if not target.exists():
        return
    for viewer in list(getattr(Viewer, "_instances", ())):
        for layer in viewer.layers:
            source = getattr(getattr(layer, "source", None), "path", None)
            if layer.name != saving and source and Path(source).exists() and Path(source).resolve() == target.resolve():
                raise WidgetInputError(f"{target} is the file layer '{layer.name}' was opened from; it is not "
                                       "overwritten. Save under another name.")


@contextlib.contextmanager
def _save_errors_shown(path: str, meta: dict):
    """Every refusal as an ``OutputWriteError`` that names the target ``path`` (and the layer)."""
    target = Path(path)
    try:
        if target.parent.exists() and not target.parent.is_dir():
            raise WidgetInputError(f"{target.parent} is a file, not a folder; save into a folder.")
        _not_an_open_file(target, _name(meta))
        yield
    except OutputWriteError:
        raise  # it names the target already
    except MedsegError as exc:  # a ValueError, which napari would hide
        raise OutputWriteError(f"Cannot save '{_name(meta)}' to {target}: {exc}") from exc
    except OSError as exc:
        raise write_error(target, exc) from exc
