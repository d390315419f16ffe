"""Per-nucleus measurements: the object table.

Sums per id with ``np.bincount`` over bands of rows (area, centroid, mean intensity): the same
numbers as scikit-image's ``regionprops_table`` (tested against it), in bounded memory, without
a Python step per nucleus (which held the GIL against napari's GUI thread while the Objects
widget measured) and without importing ``skimage.measure`` (1.1 s the first time). A 1000²
MoNuSeg image, 398 nuclei, with class votes and RGB means: 0.12 s -> 0.08 s (busy machine).
"""

from __future__ import annotations

import numpy as np

from ..io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM, is_plausible_pixel_size
from .votes import InstanceInputError, instance_classes, table_size_ok


def _checked_pixel_size(value) -> float:
    """µm per pixel for areas in µm²: 100 had made a 16 px nucleus 160000 µm², -0.25 lost its sign."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if not is_plausible_pixel_size(size):
        low, high = PLAUSIBLE_PIXEL_SIZE_UM
        raise InstanceInputError(f"Areas in µm² need the side of a pixel in µm, from {low:g} to {high:g} (0.25 for "
                                 f"40x, 0.5 for 20x), got {value!r}; give None for areas in pixels only.")
    return size


def object_table(instances: np.ndarray, class_map: np.ndarray | None = None, class_names: list[str] | None = None,
                 image: np.ndarray | None = None, pixel_size_um: float | None = None) -> dict[str, np.ndarray]:
    """Columns ``label, class, area, centroid_y, centroid_x[, mean_intensity...]``, one row per object.

    The class of an object is the majority class of its pixels in ``class_map``.
    ``mean_intensity`` is per channel for RGB images (``mean_intensity_r/g/b``). With
    ``pixel_size_um`` (the side of a pixel in µm, one a microscope gives: else refused; ``None``
    or 0: unknown) also ``area_um2``.
    """
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise InstanceInputError(f"Objects need a 2-D integer instance map, got {instances.dtype} {instances.shape}.")
    if instances.size and int(instances.min()) < 0:
        raise InstanceInputError("The instance map holds negative ids; nucleus ids are 0 (background) or above.")
    intensity = None
    if image is not None:
        intensity = np.asarray(image)
        if intensity.shape[:2] != instances.shape:
            raise InstanceInputError(f"Image shape {intensity.shape[:2]} differs from the instance map's {instances.shape}.")
    original_ids = None
    if not table_size_ok(int(instances.max(initial=0)), instances.size):
        # sparse huge ids (another tool's): measured as 1..N (tables indexed by id stay small),
        # reported with their own ids
        from skimage.segmentation import relabel_sequential

        instances, _, original_ids = relabel_sequential(instances)
    table = _sums_by_id(instances, intensity)
    out: dict[str, np.ndarray] = {
        "label": table["label"] if original_ids is None else np.asarray(original_ids[table["label"]]),
        "area": table["area"],
        "centroid_y": table["centroid_y"],
        "centroid_x": table["centroid_x"],
    }
    if pixel_size_um:
        out["area_um2"] = out["area"] * _checked_pixel_size(pixel_size_um) ** 2
    if class_map is not None:
        votes = instance_classes(instances, class_map)
        ids = votes[table["label"]]
        out["class_id"] = ids
        if class_names is not None:
            # a nucleus whose pixels the class map calls background has no class: not "background"
            out["class"] = np.array([UNCLASSIFIED if i == 0 else class_names[i] if i < len(class_names) else str(i)
                                     for i in ids], dtype=object)
    if intensity is not None:
        if intensity.ndim == 2:
            out["mean_intensity"] = table["intensity_mean"][:, 0]
        else:
            for c, name in zip(range(intensity.shape[-1]), "rgb" if intensity.shape[-1] == 3 else range(99)):
                out[f"mean_intensity_{name}"] = table["intensity_mean"][:, c]
    return out


UNCLASSIFIED = "unclassified"  # the class column of a nucleus the class map has no class for
BAND_PIXELS = 1 << 20  # pixels summed at a time: float64 weights of a band stay ~8 MB


def _sums_by_id(instances: np.ndarray, intensity: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per id present (ascending): ``label``, ``area``, ``centroid_y/x`` (pixel centres, as
    regionprops) and ``intensity_mean`` ``(objects, channels)`` where an image is given."""
    height, width = instances.shape
    size = int(instances.max(initial=0)) + 1
    channels = 0 if intensity is None else (1 if intensity.ndim == 2 else intensity.shape[-1])
    area = np.zeros(size, np.int64)
    y_sum, x_sum = np.zeros(size), np.zeros(size)
    value_sums = np.zeros((channels, size))
    rows_per_band = max(1, BAND_PIXELS // max(width, 1))
    columns = np.arange(width, dtype=np.float64)
    for top in range(0, height, rows_per_band):
        band = instances[top:top + rows_per_band]
        ids = band.ravel().astype(np.intp, copy=False)  # bincount refuses uint64 (ids < 2**31 here)
        rows = band.shape[0]
        area += np.bincount(ids, minlength=size)
        y_sum += np.bincount(ids, weights=np.repeat(np.arange(top, top + rows, dtype=np.float64), width),
                             minlength=size)
        x_sum += np.bincount(ids, weights=np.broadcast_to(columns, band.shape).ravel(), minlength=size)
        if channels:
            values = intensity[top:top + rows_per_band].reshape(-1, channels)
            for c in range(channels):
                value_sums[c] += np.bincount(ids, weights=values[:, c].astype(np.float64), minlength=size)
    labels = np.flatnonzero(area[1:]) + 1
    counts = area[labels]
    table = {"label": labels, "area": counts, "centroid_y": y_sum[labels] / counts,
             "centroid_x": x_sum[labels] / counts}
    if channels:
        table["intensity_mean"] = (value_sums[:, labels] / counts).T
    return table


def counts_per_class(table: dict[str, np.ndarray]) -> dict[str, int]:
    if "class" not in table:
        return {"all": int(len(table["label"]))}
    names, counts = np.unique(table["class"].astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def nucleus_count(instances: np.ndarray) -> int:
    """How many nuclei an instance map holds: its distinct ids above 0 (ids need not be
    consecutive, so the highest id over-counts)."""
    ids = np.unique(np.asarray(instances))
    return int(np.count_nonzero(ids > 0))
