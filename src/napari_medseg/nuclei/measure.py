"""Per-nucleus measurements (scikit-image regionprops): the object table."""

from __future__ import annotations

import numpy as np

from .votes import InstanceInputError, instance_classes, table_size_ok


def object_table(instances: np.ndarray, class_map: np.ndarray | None = None, class_names: list[str] | None = None,
                 image: np.ndarray | None = None, pixel_size_um: float | None = None) -> dict[str, np.ndarray]:
    """Columns ``label, class, area, centroid_y, centroid_x[, mean_intensity...]``, one row per object.

    The class of an object is the majority class of its pixels in ``class_map``.
    ``mean_intensity`` is per channel for RGB images (``mean_intensity_r/g/b``). With
    ``pixel_size_um`` (the side of a pixel in µm) also ``area_um2``.
    """
    from skimage.measure import regionprops_table

    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise InstanceInputError(f"Objects need a 2-D integer instance map, got {instances.dtype} {instances.shape}.")
    props = ["label", "area", "centroid"]
    intensity = None
    if image is not None:
        intensity = np.asarray(image)
        if intensity.shape[:2] != instances.shape:
            raise InstanceInputError(f"Image shape {intensity.shape[:2]} differs from the instance map's {instances.shape}.")
        props.append("intensity_mean")
    original_ids = None
    if not table_size_ok(int(instances.max(initial=0)), instances.size):
        # sparse huge ids (another tool's): measured as 1..N (tables indexed by id stay small),
        # reported with their own ids
        from skimage.segmentation import relabel_sequential

        instances, _, original_ids = relabel_sequential(instances)
    table = regionprops_table(instances, intensity_image=intensity, properties=props)
    out: dict[str, np.ndarray] = {
        "label": table["label"] if original_ids is None else np.asarray(original_ids[table["label"]]),
        "area": table["area"].astype(np.int64),
        "centroid_y": table["centroid-0"],
        "centroid_x": table["centroid-1"],
    }
    if pixel_size_um:
        out["area_um2"] = out["area"] * float(pixel_size_um) ** 2
    if class_map is not None:
        votes = instance_classes(instances, class_map)
        ids = votes[table["label"]]
        out["class_id"] = ids
        if class_names is not None:
            out["class"] = np.array([class_names[i] if i < len(class_names) else str(i) for i in ids], dtype=object)
    if intensity is not None:
        if intensity.ndim == 2:
            out["mean_intensity"] = table["intensity_mean"]
        else:
            for c, name in zip(range(intensity.shape[-1]), "rgb" if intensity.shape[-1] == 3 else range(99)):
                out[f"mean_intensity_{name}"] = table[f"intensity_mean-{c}"]
    return out


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
