"""Sample data contribution: real H&E with ground truth, shipped in the package."""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from ..nuclei.votes import instance_classes
from ..io.images import read_image, read_label_map
from .layers import class_labels_kwargs, image_kwargs, instance_labels_kwargs

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
# both samples are 40x scans (CoNSeP's and MoNuSeg's ~0.25 µm/px: sample_data/README.md); a PNG
# records no pixel size, so it is given here: the layers open in µm as a calibrated file does,
# the scale bar reads µm, Objects measures µm² and Segment sees the image at its model's size
SAMPLE_PIXEL_SIZE_UM = 0.25


def sample_path(name: str):
    return files("napari_medseg") / "sample_data" / name


def _in_micrometres(**extra) -> dict:
    """Layer settings placing a sample at ``SAMPLE_PIXEL_SIZE_UM``, as the reader does a calibrated TIFF."""
    size = SAMPLE_PIXEL_SIZE_UM
    return {"scale": (size, size), "units": ("micrometer", "micrometer"), **extra}


def consep_sample() -> list[tuple]:
    image = read_image(sample_path("consep_train_19_005.png"))
    labels = read_label_map(sample_path("consep_train_19_005_labels.tif")).astype(np.uint8)
    instances = read_label_map(sample_path("consep_train_19_005_instances.tif"))
    return [
        (image, image_kwargs("CoNSeP H&E", image, **_in_micrometres(metadata={"pixel_size_um": SAMPLE_PIXEL_SIZE_UM})),
         "image"),
        # the hidden nuclei under the shown classes: napari selects the last layer added, and a
        # newcomer's first brush stroke went to a layer they could not see
        (instances, instance_labels_kwargs("CoNSeP instances", CONSEP_CLASSES, None,
                                           instance_classes(instances, labels), visible=False, **_in_micrometres()),
         "labels"),
        (labels, class_labels_kwargs("CoNSeP ground truth", CONSEP_CLASSES, **_in_micrometres()), "labels"),
    ]


def monuseg_sample() -> list[tuple]:
    image = read_image(sample_path("monuseg_TCGA-A7-A13E_crop.png"))
    instances = read_label_map(sample_path("monuseg_TCGA-A7-A13E_crop_instances.tif"))
    return [
        (image, image_kwargs("MoNuSeg H&E", image, **_in_micrometres(metadata={"pixel_size_um": SAMPLE_PIXEL_SIZE_UM})),
         "image"),
        (instances, instance_labels_kwargs("MoNuSeg instances", visible=False, **_in_micrometres()), "labels"),
        ((instances > 0).astype(np.uint8),
         class_labels_kwargs("MoNuSeg ground truth", ["background", "nucleus"], **_in_micrometres()), "labels"),
    ]
