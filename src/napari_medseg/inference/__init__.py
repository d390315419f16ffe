"""Inference: any image, any size, through a model, seam-free at flat memory.

``settings`` (what to do) -> ``source`` (the image, read on demand) -> ``windows`` (where the
tiles are, how they are weighted) -> ``forward`` (the model call) -> ``blend`` (stitching into
a band buffer) -> ``postprocess`` (clean-up); ``segmenter`` drives it all for one loaded model;
``batch`` writes a folder of predictions.

The names below load their module (and torch) on first use, so that reading the settings'
defaults (e.g. for ``medseg --help``) stays instant.
"""

from ..lazy_names import lazy_getattr

_EXPORTS = {
    "classify": "blend", "InferenceMemoryError": "forward", "RunReport": "forward",
    "PostprocessSettings": "postprocess", "Segmenter": "segmenter", "segment_file": "segmenter",
    "InferenceSettingsError": "settings", "TileSettings": "settings", "ImageSource": "source",
    "BACKENDS": "settings", "PRECISIONS": "settings", "BackendError": "backends",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
