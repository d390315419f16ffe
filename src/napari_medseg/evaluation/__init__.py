"""Evaluation: predictions against ground truth (pixel and nucleus metrics, error maps, reports)
and the tuning of a model's operating point on labelled images."""
