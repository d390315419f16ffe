"""Evaluation: predictions against ground truth (pixel and nucleus metrics, error maps, reports),
a model and the classical baseline scored on the same images (benchmark), and the tuning of a
model's operating point on labelled images (threshold)."""

from importlib import import_module

# loaded on first use, as napari_medseg.inference's names are
_EXPORTS = {
    "PairEvaluation": "report", "evaluate_maps": "report", "evaluate_folders": "report",
    "GroundTruth": "ground_truth", "compare_to_ground_truth": "ground_truth",
    "ground_truth_from_label_map": "ground_truth", "MetricsInputError": "semantic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
