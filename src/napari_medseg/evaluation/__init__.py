"""Evaluation: predictions against ground truth (pixel and nucleus metrics, error maps, reports),
a model and the classical baseline scored on the same images (benchmark), and the tuning of a
model's operating point on labelled images (threshold)."""

from ..lazy_names import lazy_getattr

# loaded on first use, as napari_medseg.inference's names are
_EXPORTS = {
    "PairEvaluation": "report", "evaluate_maps": "report", "evaluate_folders": "report",
    "GroundTruth": "ground_truth", "compare_to_ground_truth": "ground_truth",
    "ground_truth_from_label_map": "ground_truth", "MetricsInputError": "semantic",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
