"""Nuclei: class maps split into nucleus instances, their classes, distance maps and
measurements, and the classical (no learning) baseline."""
