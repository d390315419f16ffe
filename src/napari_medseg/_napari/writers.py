"""Writer contributions: Labels layers as QuPath GeoJSON outlines or as label TIFFs."""

from __future__ import annotations

import numpy as np

from ..nuclei.votes import instance_classes
from ..nuclei.watershed import semantic_to_instances
from ..io.geojson import write_geojson
from ..io.images import write_label_map
from .layers import METADATA_KEY


def write_labels_geojson(path: str, data, meta: dict) -> list[str]:
    labels = np.asarray(data)
    info = meta.get("metadata", {}).get(METADATA_KEY, {})
    if info.get("kind") == "instances":
        table = info.get("instance_classes")
        if table is None or not info.get("classes"):
            write_geojson(path, labels)
        else:  # the classes the nuclei had when made; ids added since are left unclassified (0)
            votes = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
            n = min(len(votes), len(table))
            votes[:n] = np.asarray(table)[:n]
            write_geojson(path, labels, votes, info["classes"], info.get("colors"))
    else:  # a class map: nuclei by watershed, each with its majority class
        instances = semantic_to_instances(labels)
        write_geojson(path, instances, instance_classes(instances, labels), info.get("classes"), info.get("colors"))
    return [path]


def write_labels_tiff(path: str, data, meta: dict) -> list[str]:
    write_label_map(path, np.asarray(data))
    return [path]
