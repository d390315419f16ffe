"""What a Segment run becomes: the Labels layers of its class map and nuclei (made in the worker:
building a layer needs no GUI thread, adding it does) and the status line that says what it found.

An in-memory run (``ImageRun``) keeps its arrays, for re-thresholding; a slide run (``SlideRun``)
has its results on disk, read back lazily from its zarr pyramids (or into memory for a small region).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..inference.regions import Region
from ..inference.rethreshold import KeptRun
from ..inference.slide import SlideResult
from ..inference.slide_process import SlideModelInfo
from ..io.slide_outputs import pyramid_levels, read_nucleus_classes
from ..nuclei.measure import nucleus_count
from ..nuclei.votes import instance_classes
from ..nuclei.watershed import INSTANCE_MAX_PIXELS
from .layers import (METADATA_KEY, NUCLEUS_OUTLINE_PX, class_labels_kwargs, instance_labels_kwargs,
                     shown_plane_words, with_origin)

if TYPE_CHECKING:
    from ..inference.segmenter import Segmenter  # imported with the first model, in the worker


@dataclass
class ImageRun:
    """An in-memory run: its arrays, and where they sit in the image (``region``, ``mask``)."""

    labels: np.ndarray
    instances: np.ndarray | None
    kept: KeptRun | None
    segmenter: Segmenter
    layer: object
    region: Region | None
    mask: np.ndarray | None
    layers: tuple  # the class map's and the nuclei's Labels layers (made in the worker), or None
    summary: str  # the status line
    note: str = ""  # what the status says below it of the run's image (a stack's plane), re-thresholded too


@dataclass
class SlideRun:
    """A slide run: what ``iter_predict_slide`` made, on disk, and the Labels layers of its class
    map and nuclei (``None`` without nuclei), made in the worker over the lazily read pyramids."""

    result: SlideResult
    model: SlideModelInfo
    layer: object
    layers: tuple


def slide_layer_args(result: SlideResult, model: SlideModelInfo, name: str, where: dict) -> tuple:
    """``labels_layers`` arguments for a slide run's zarr pyramids."""
    import zarr

    root = zarr.open_group(str(result.files["store"]), mode="r")
    folder = str(result.files["store"].parent)  # where its exports are (File > Save points there)
    classes = _pyramid(root["classes"])
    class_kwargs = {"multiscale": classes["multiscale"],
                    **class_labels_kwargs(f"{name} segmentation", model.classes, model.colors, **where)}
    class_kwargs["metadata"][METADATA_KEY]["results"] = folder
    if "instances" not in root:
        return classes["data"], class_kwargs, None, None
    nuclei = _pyramid(root["instances"])
    votes = _slide_nucleus_classes(result.files.get("csv"), result.nuclei)
    instance_kwargs = {"multiscale": nuclei["multiscale"],
                       **instance_labels_kwargs(f"{name} nuclei", model.classes, model.colors, votes, **where)}
    instance_kwargs["metadata"][METADATA_KEY]["results"] = folder
    return classes["data"], class_kwargs, nuclei["data"], instance_kwargs


def slide_region_layer_args(result: SlideResult, model: SlideModelInfo, name: str, where: dict,
                             polygon: np.ndarray | None) -> tuple:
    """``labels_layers`` arguments for a slide run's region read into memory from its zarr store:
    2-D maps of the region, placed ``where`` it lies on the slide, with its origin and polygon
    recorded (``with_origin``) as a region of an image has them."""
    import zarr

    root = zarr.open_group(str(result.files["store"]), mode="r")
    folder = str(result.files["store"].parent)
    region = result.region
    origin = (region.y, region.x)
    inside = None if polygon is None else np.asarray(polygon, float) - origin
    level0 = lambda group: np.asarray(pyramid_levels(group)[0][region.slices])  # noqa: E731
    class_kwargs = with_origin(class_labels_kwargs(f"{name} segmentation", model.classes, model.colors, **where),
                               origin, inside)
    class_kwargs["metadata"][METADATA_KEY]["results"] = folder
    if "instances" not in root:
        return level0(root["classes"]), class_kwargs, None, None
    votes = _slide_nucleus_classes(result.files.get("csv"), result.nuclei)
    instance_kwargs = with_origin(instance_labels_kwargs(f"{name} nuclei", model.classes, model.colors, votes,
                                                         **where), origin, inside)
    instance_kwargs["metadata"][METADATA_KEY]["results"] = folder
    return level0(root["classes"]), class_kwargs, level0(root["instances"]).astype(np.int32), instance_kwargs


# a slide run's nuclei take their class colours up to this many (a colour-table entry each, made
# in Python: ~0.5 s for 50,000 in the worker); beyond, napari's random colours
SLIDE_CLASS_COLOURED_NUCLEI = 50_000


def _slide_nucleus_classes(csv_path, count: int | None) -> np.ndarray | None:
    """``[id] -> class index`` of a slide run's nuclei, from its per-nucleus table (the majority
    class of each, as the GeoJSON has it); ``None`` without one or above the cap."""
    if not count or count > SLIDE_CLASS_COLOURED_NUCLEI or csv_path is None or not Path(csv_path).is_file():
        return None
    # sparse ids would make a colour table far larger than the nuclei: not worth it
    return read_nucleus_classes(csv_path, max_id=10 * SLIDE_CLASS_COLOURED_NUCLEI)


def labels_layers(labels, class_kwargs: dict, instances, instance_kwargs: dict | None) -> tuple:
    """The class map's and the nuclei's Labels layers, made in the worker: building a layer (its
    colour tables, its features) is napari's work that needs no GUI thread; adding it does."""
    from napari.layers import Labels

    nuclei = None
    if instances is not None:
        nuclei = Labels(instances, **instance_kwargs)
        nuclei.contour = NUCLEUS_OUTLINE_PX
    return Labels(labels, **class_kwargs), nuclei


RUNTIME_NAMES = {"torch": "PyTorch", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def result_summary(labels: np.ndarray, instances: np.ndarray | None, threshold: float | None,
                   classes: list[str], nuclei_asked: bool, report, said: tuple | list = ()) -> str:
    """What a run found: the nuclei, each class's share of the image, the threshold used (made
    in the worker: counting nuclei takes tens of ms on a 1000² image); the report's notes but
    those ``said`` already."""
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    covered = "of the image's area: " + ", ".join(f"{c} {100 * n / labels.size:.1f}%"
                                                  for c, n in zip(classes[1:], counts[1:]))
    parts = [f"{nucleus_count(instances)} nuclei"] if instances is not None else []
    if instances is None and nuclei_asked:
        parts.append(f"no nuclei layer above {INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx")
    parts.append(covered)
    if threshold is not None:
        parts.append(f"nucleus threshold {threshold:.2f}")
    if report.skipped_background:
        parts.append(f"{report.skipped_background}/{report.tiles} glass tiles skipped")
    parts.append(f"run by {RUNTIME_NAMES.get(report.backend, report.backend)} ({report.precision})")
    return with_notes("Done: " + "; ".join(parts), [note for note in report.notes if note not in said])


def with_notes(summary: str, notes: list[str]) -> str:
    """A status line with what the user should know (a gray or dark-background image) each in a
    paragraph of its own below it, where it is read, not at the end of a long line."""
    return summary + "".join(f"\n\nNote: {note}" for note in notes)


def plane_said(viewer, layer, plane: tuple[int, ...]) -> str:
    """Which plane of a stack was segmented."""
    return (f"'{layer.name}' is a stack: the image shown ({shown_plane_words(viewer, layer, plane)}) was segmented, "
            "and its result shows on that image only. Move the slider and Segment again for another.")


def on_grid(value, where: dict):
    """A 2-D result array on the grid ``where`` places it on (one plane of a stack: ``(1, H, W)``);
    anything else (the layer settings) as it is."""
    if isinstance(value, np.ndarray) and value.ndim < len(where["scale"]):
        return value.reshape((1,) * (len(where["scale"]) - value.ndim) + value.shape)
    return value


def as_layer(array: np.ndarray, layer) -> np.ndarray:
    """A re-thresholded 2-D map in the shape of the layer it replaces (a stack plane's: ``(1, H, W)``)."""
    return array.reshape(layer.data.shape) if layer.data.ndim > array.ndim else array


def masked(array: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray | None:
    """``array`` with the outside of a run's polygon (``mask``) as background."""
    return array if array is None or mask is None else np.where(mask, array, 0).astype(array.dtype)


def result_layer_kwargs(name: str, segmenter, labels: np.ndarray, instances: np.ndarray | None,
                         where: dict, origin: tuple[int, int] | None = None,
                         polygon: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """The ``add_labels`` settings of a run's class map and nuclei, placed ``where`` on the canvas;
    ``origin``: the image pixel of a region's corner, for exports, ``polygon``: the drawn polygon
    in the region's pixels, for Metrics (``with_origin``)."""
    classes, colors = segmenter.classes, segmenter.meta.colors
    class_kwargs = with_origin(class_labels_kwargs(f"{name} segmentation", classes, colors, **where), origin, polygon)
    if instances is None:
        return class_kwargs, None
    return class_kwargs, with_origin(nuclei_kwargs(f"{name} nuclei", classes, colors, labels, instances, **where),
                                     origin, polygon)


def nuclei_kwargs(name: str, classes: list[str], colors, labels: np.ndarray, instances: np.ndarray,
                   **where) -> dict:
    """The nuclei layer's settings: each nucleus in the colour and name of its majority class."""
    return instance_labels_kwargs(name, classes, colors, instance_classes(instances, labels), **where)


def _pyramid(group) -> dict:
    """A zarr multiscale group as ``add_labels`` arguments (levels read lazily)."""
    levels = pyramid_levels(group)
    return {"data": levels if len(levels) > 1 else levels[0], "multiscale": len(levels) > 1}


def slide_summary(result: SlideResult) -> str:
    """What a slide run found: nuclei per class and each class's share of the region, and where
    its files are."""
    r, parts = result.region, []
    if "geojson" in result.files:
        counts = ", ".join(f"{name} {n}" for name, n in result.counts.items())
        parts.append(f"{result.nuclei} nuclei" + (f" ({counts})" if counts else ""))
    shares = ", ".join(f"{name} {100 * n / max(result.region_px, 1):.1f}%" for name, n in result.class_px.items())
    parts.append(f"{shares} of the region x={r.x}, y={r.y}, {r.width} x {r.height} px")
    # as medseg predict says it: the blocks run (glass skipped) hold more than the tissue itself
    parts.append(f"{100 * result.tissue_fraction:.0f}% tissue ({result.segmented_px / 1e6:.1f} Mpx segmented)")
    parts.append(f"results in {result.files['store'].parent}")
    return with_notes("Done: " + "; ".join(parts), result.notes)
