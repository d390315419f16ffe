"""Nuclei: class maps split into nucleus instances, their classes, distance maps and
measurements, and the classical (no learning) baseline."""

from importlib import import_module

# loaded on first use (scipy and scikit-image only when needed)
_EXPORTS = {
    "object_table": "measure", "InstanceSettings": "watershed", "semantic_to_instances": "watershed",
    "nucleus_count": "measure", "counts_per_class": "measure",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
