"""Evaluation: predictions against ground truth (pixel and nucleus metrics, error maps, reports),
a model and the classical baseline scored on the same images (benchmark), and the tuning of a
model's operating point on labelled images (threshold)."""
