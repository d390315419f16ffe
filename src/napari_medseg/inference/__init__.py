"""Inference: any image, any size, through a model, seam-free at flat memory.

``settings`` (what to do) -> ``source`` (the image, read on demand) -> ``windows`` (where the
tiles are, how they are weighted) -> ``forward`` (the model call) -> ``blend`` (stitching into
a band buffer) -> ``postprocess`` (clean-up); ``segmenter`` drives it all for one loaded model.
"""

from .blend import classify
from .forward import InferenceMemoryError, RunReport
from .postprocess import PostprocessSettings
from .segmenter import Segmenter, segment_file
from .settings import InferenceSettingsError, TileSettings
from .source import ImageSource

__all__ = ["ImageSource", "InferenceMemoryError", "InferenceSettingsError", "PostprocessSettings", "RunReport",
           "Segmenter", "TileSettings", "classify", "segment_file"]
