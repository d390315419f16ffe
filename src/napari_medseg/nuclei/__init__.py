"""Nuclei: class maps split into nucleus instances, their classes, distance maps and
measurements, and the classical (no learning) baseline."""

from ..lazy_names import lazy_getattr

# loaded on first use (scipy and scikit-image only when needed)
_EXPORTS = {
    "object_table": "measure", "InstanceSettings": "watershed", "semantic_to_instances": "watershed",
    "nucleus_count": "measure", "counts_per_class": "measure",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
