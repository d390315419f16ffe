"""Segment once, re-threshold many times: keep a run's probabilities and distance map, and
remake the class map and nuclei from them for a new nucleus threshold, marker threshold or
minimum size without running the network again (as stardist-napari and cellpose offer).

Kept only for images up to ``KEEP_MAX_PIXELS``: the probabilities are ``(C, H, W)`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..nuclei.watershed import INSTANCE_MAX_PIXELS, INSTANCE_STEPS, InstanceSettings, iter_semantic_to_instances
from ..steps import chain, run_steps
from .class_decision import classify
from .postprocess import PostprocessSettings, postprocess_class_map
from .rescale import settings_at_image_scale
from .settings import TileSettings
from .source import ImageSource

if TYPE_CHECKING:  # its runtime (torch) loads with the model, not with this module
    from .segmenter import Segmenter

# 16 Mpx x 5 classes x 4 bytes = 320 MB of kept probabilities at most
KEEP_MAX_PIXELS = 16_000_000


@dataclass(frozen=True)
class Thresholds:
    """What re-thresholding may change; ``nucleus=None`` is the argmax. ``marker`` and
    ``min_size`` replace the model's own (``Segmenter.instance_settings``) where given."""

    nucleus: float | None = None
    marker: float | None = None
    min_size: int | None = None

    def overrides(self) -> dict:
        """The ``InstanceSettings`` fields given here."""
        given = {"marker_threshold": self.marker, "min_size": self.min_size}
        return {k: v for k, v in given.items() if v is not None}


def apply_thresholds(segmenter, tiles: TileSettings, chosen: Thresholds) -> tuple[TileSettings, InstanceSettings]:
    """A run's settings from what the user chose: sets ``segmenter``'s nucleus threshold
    (``chosen.nucleus`` 0 or None: the model's own tuned one) and returns ``tiles`` checked for its
    network and the model's nucleus settings with ``chosen``'s in place."""
    segmenter.foreground_threshold = chosen.nucleus or segmenter.meta.foreground_threshold
    return tiles.checked(segmenter.meta.model.output_stride), segmenter.instance_settings_with(chosen.overrides())


@dataclass
class KeptRun:
    """A network run's outputs: probabilities ``(C, H, W)``, the distance map (or ``None`` for
    models without a distance head) and the clean-up that follows the threshold. Sizes in the
    settings are model pixels; ``scale`` (model pixels per image pixel) converts them."""

    probabilities: np.ndarray
    distance: np.ndarray | None
    postprocess: PostprocessSettings
    instance_settings: InstanceSettings
    scale: float = 1.0
    class_weights: list[float] | None = None  # the model's (``classify``): kept through re-thresholding

    def class_map(self, thresholds: Thresholds) -> np.ndarray:
        labels = classify(self.probabilities, thresholds.nucleus, self.class_weights).astype(np.uint8)
        return postprocess_class_map(labels, settings_at_image_scale(self.scale, self.postprocess)[0])

    def iter_result(self, thresholds: Thresholds, nuclei: bool = True):
        """Generator: yields ``(step, INSTANCE_STEPS)``; returns ``(class map, instances or None)``."""
        labels = self.class_map(thresholds)
        if not nuclei:
            return labels, None
        settings = replace(self.instance_settings, **thresholds.overrides())
        settings = settings_at_image_scale(self.scale, None, settings)[1]
        instances = yield from iter_semantic_to_instances(labels, settings, self.distance)
        return labels, instances

    def result(self, thresholds: Thresholds, nuclei: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        return run_steps(self.iter_result(thresholds, nuclei))


def iter_segment_keeping(segmenter: Segmenter, image, settings: TileSettings | None = None,
                         postprocess: PostprocessSettings | None = None,
                         instance_settings: InstanceSettings | None = None, nuclei: bool = True,
                         pixel_size_um: float | None = None):
    """Generator like ``Segmenter.iter_segment_nuclei`` (tiles, then the watershed's steps);
    returns ``(class map, instances or None, KeptRun or None)``. ``pixel_size_um``: the image's, if
    known (the network then sees it at the model's pixel size; results are on the image's grid).

    The run is kept when the image is small enough (``KEEP_MAX_PIXELS``); nuclei are made up to
    ``INSTANCE_MAX_PIXELS``. The class map is the segmenter's own (its threshold, then clean-up).
    """
    postprocess = postprocess or PostprocessSettings()
    instance_settings = instance_settings or segmenter.instance_settings
    source = image if isinstance(image, ImageSource) else ImageSource(image, segmenter.meta.model.in_channels)
    height, width, image = source.height, source.width, source
    if height * width > KEEP_MAX_PIXELS:
        if not nuclei:
            labels = yield from segmenter.iter_segment(image, settings, postprocess, pixel_size_um=pixel_size_um)
            return labels, None, None
        labels, instances = yield from segmenter.iter_segment_nuclei(image, settings, postprocess, instance_settings,
                                                                     pixel_size_um=pixel_size_um)
        return labels, instances, None
    probabilities = np.zeros((len(segmenter.classes), height, width), np.float32)
    distance = np.zeros((height, width), np.float32) if segmenter.has_distance_head else None
    kept = KeptRun(probabilities, distance, postprocess, instance_settings, segmenter.scale_for(pixel_size_um),
                   segmenter.class_weights)
    tiles = segmenter.iter_segment(image, settings, postprocess, probabilities_out=probabilities, distance_out=distance,
                                   pixel_size_um=pixel_size_um)
    if not nuclei or height * width > INSTANCE_MAX_PIXELS:
        labels = yield from tiles
        return labels, None, kept
    image_settings = settings_at_image_scale(kept.scale, None, instance_settings)[1]
    labels, instances = yield from chain(
        tiles, INSTANCE_STEPS, lambda labels: iter_semantic_to_instances(labels, image_settings, distance))
    return labels, instances, kept
